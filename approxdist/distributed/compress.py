"""The sparse hook's payload in 16 bits: sampling and compression composed.

The sparse hook sends only the sampled slices; casting them to float16 (or bfloat16)
halves that again, so sample_ratio 0.33 sends a sixth of the dense float32 bytes. Like
torch's `fp16_compress_wrapper`, the bucket is cast before the hook packs it and the
reduced result is copied back into the float32 bucket. Unlike it, the wrapped hook keeps
the sparse hook's `payload` form (so forward_overlap can still split a bucket between
two collectives), and the state's `dense_bytes` stays what DDP's default float32
all-reduce would have sent, so `payload_bytes / dense_bytes` is the share of bytes saved.
The reduction is lossy by the cast's rounding, as torch's fp16 hook is; the unsampled
slices are still exactly zero.
"""
import torch

from .futures import then
from .payload import PayloadHook, with_payload

__all__ = ["COMPRESS", "compress_wrapper"]

# The 16-bit dtypes the sparse payload can travel in, by the name register(compress=...)
# and approxdist-train's "sparse-<name>" hooks use.
COMPRESS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compress_wrapper(hook, compress: str):
    """`hook` (approxdist's sparse_allreduce_hook, whose state counts dense_bytes) with
    its bucket cast to `compress` ("fp16" or "bf16") before packing, and back after."""
    if compress not in COMPRESS:
        raise ValueError(f"compress must be one of {', '.join(map(repr, COMPRESS))}, got {compress!r}")
    dtype = COMPRESS[compress]
    # only a payload the hook carries: torch's own hooks are not meant to be wrapped here
    payload = hook.payload if isinstance(hook, PayloadHook) else None

    def cast(state, bucket):
        """Set the bucket's buffer to its cast copy; returns the original buffer."""
        buffer = bucket.buffer()
        bucket.set_buffer(buffer.to(dtype))
        # The hook counts the cast bucket; count the bytes DDP's default hook would send.
        state.dense_bytes += buffer.numel() * (buffer.element_size() - torch.finfo(dtype).bits // 8)
        return buffer

    def compressed_hook(state, bucket):
        buffer = cast(state, bucket)
        fut = hook(state, bucket)

        def decompress(f):
            buffer.copy_(f.value())
            return buffer

        return then(fut, decompress)

    if payload is not None:
        def compressed_payload(state, bucket):
            buffer = cast(state, bucket)
            sent, group, finish = payload(state, bucket)

            def finish_and_decompress(summed):
                return buffer.copy_(finish(summed))

            return sent, group, finish_and_decompress

        with_payload(compressed_hook, compressed_payload)
    compressed_hook.__name__ = f"{getattr(hook, '__name__', 'hook')}_{compress}"
    return compressed_hook
