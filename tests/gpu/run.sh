#!/usr/bin/env bash
# What only a GPU machine can check, in one script (< 5 minutes on one GPU):
#   1. build the CUDA kernels from source (JIT, as a user's first call would) and require
#      backend() == "cuda";
#   1b. the container path: build(cuda=True) with no GPU visible, then the read-only cache
#      loaded on the GPU and packing like index_select;
#   2. the kernel equality tests on CUDA tensors (tests/test_kernels.py runs its CUDA cases
#      when a GPU is present);
#   3. a one-rank NCCL DDP run of a converted resnet18 (the default mode weight_grad, and
#      mode forward): sparse hook + CUDA kernels vs the
#      default all-reduce hook, same init and batches: parameters must agree; and the sparse
#      hook with the optimizer stepping inside it (register(optimizer=), on the NCCL
#      future's stream), and with the next forward overlapping the transfer
#      (register(overlap_forward=True)), must equal the sparse hook with the usual step,
#      bit for bit; and register(compress="fp16") must equal torch's fp16_compress_hook on
#      the same sampled model, bit for bit, at a quarter of the float32 bytes (ratio 0.5);
#   4. `approxdist-bench kernels` on the GPU (figures for docs/benchmarks.md);
#   5. experiments/tools/hook_share.py: pack+unpack as a share of a one-rank resnet50 step, at 224 and 32 px.
# Usage: tests/gpu/run.sh [OUTDIR]   (PYTHON=... picks the interpreter; default: .venv's, else python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-${OUT:-/tmp/approxdist-gpu}}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A private build cache, so a stale build from another checkout can never be picked up.
export APPROXDIST_CACHE_DIR="${APPROXDIST_CACHE_DIR:-$OUT/cache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset APPROXDIST_KERNELS
SECONDS=0
step() { echo; echo "== [$SECONDS s] $*"; }

step "environment"
"$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available(), "no GPU visible"
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # compile for this GPU only: faster
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
  export TORCH_CUDA_ARCH_LIST
fi

step "1. build the CUDA kernels"
"$PYTHON" - <<'EOF'
import time, warnings
import approxdist.kernels as k
t = time.time()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    name = k.build(verbose=True)
for w in caught:
    print("warning:", w.message)
print(f"backend() = {name} (build {time.time() - t:.1f} s)")
assert name == "cuda", name
EOF

step "1b. the container path: kernels built with no GPU visible (build(cuda=True), as docker build does), then loaded read-only"
PREBUILT="$OUT/prebuilt-cache"
rm -rf "$PREBUILT"
CUDA_VISIBLE_DEVICES="" APPROXDIST_CACHE_DIR="$PREBUILT" "$PYTHON" -c \
  "import torch, approxdist.kernels as k; assert not torch.cuda.is_available(); k.build(cuda=True); print('prebuilt with no GPU visible')"
chmod -R a-w "$PREBUILT"  # as in an image run by another user: loaded as it is, never rebuilt
APPROXDIST_CACHE_DIR="$PREBUILT" "$PYTHON" - <<'EOF'
import warnings
import torch
import approxdist.kernels as k
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback to the reference warns: fail instead
    assert k.backend() == "cuda", k.backend()
    grads = [torch.randn(64, 48, 3, 3, device="cuda"), torch.randn(10, device="cuda")]
    indices = [torch.tensor([0, 5, 7, 20, 47], device="cuda"), None]
    flat = k.pack(grads, indices)
want = torch.cat([grads[0][:, indices[0]].reshape(-1), grads[1]])
assert torch.equal(flat, want), "prebuilt pack differs from index_select"
print("prebuilt kernels load read-only and pack like index_select")
EOF
chmod -R u+w "$PREBUILT"

step "2. kernel equality tests (CPU and CUDA tensors)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15

step "3. one-rank NCCL DDP: converted resnet18, sparse hook vs default hook, in-hook step and forward overlap vs usual"
"$PYTHON" - <<'EOF'
import socket
import torch, torch.distributed as dist, torchvision
import approxdist as ad
import approxdist.kernels as kernels
from torch.nn.parallel import DistributedDataParallel as DDP

torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
dev = torch.device("cuda", 0); torch.cuda.set_device(dev)
def build(mode=None):  # built from one seed each time; mode None: the default, weight_grad
    torch.manual_seed(0)
    net = ad.convert_model(torchvision.models.resnet18(num_classes=10), 0.5, distributed=True, mode=mode)
    return DDP(net.to(dev), device_ids=[0], bucket_cap_mb=5)
models = {"default": build(), "sparse": build(), "step": build(), "overlap": build(),
          "fp16": build(), "sparse_fp16": build(), "default_fwd": build("forward"), "sparse_fwd": build("forward")}
opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
state = ad.distributed.register(models["sparse"])
ad.distributed.register(models["step"], optimizer=opts["step"])
ad.distributed.register(models["overlap"], optimizer=opts["overlap"], overlap_forward=True)
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
models["fp16"].register_comm_hook(None, default_hooks.fp16_compress_hook)
state16 = ad.distributed.register(models["sparse_fp16"], compress="fp16")
state_fwd = ad.distributed.register(models["sparse_fwd"])
gen = torch.Generator().manual_seed(1)
batches = [(torch.randn(16, 3, 64, 64, generator=gen), torch.randint(10, (16,), generator=gen)) for _ in range(6)]
for x, y in batches:
    for k, m in models.items():
        m.train(); opts[k].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
        opts[k].step()
torch.cuda.synchronize()
worst, bitwise = 0.0, True
for (n, a), b in zip(models["default"].module.named_parameters(), models["sparse"].module.parameters()):
    bitwise &= torch.equal(a, b)
    worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item())
stats = state.stats
print(f"kernels backend {kernels.backend()}; params bitwise equal: {bitwise}; max relative diff {worst:.3g}")
print(f"payload/dense bytes: {stats['payload_bytes']}/{stats['dense_bytes']} "
      f"= {stats['payload_bytes'] / max(1, stats['dense_bytes']):.3f} over {stats['steps']} steps")
assert kernels.backend() == "cuda"
assert stats["payload_bytes"] < stats["dense_bytes"], "the sparse hook sent everything"
assert worst <= 1e-6, worst
fwd = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in
          zip(models["default_fwd"].module.parameters(), models["sparse_fwd"].module.parameters()))
print(f"mode='forward': sparse vs default hook max relative diff {fwd:.3g}; payload "
      f"{state_fwd.stats['payload_bytes']}/{state_fwd.stats['dense_bytes']}")
assert fwd <= 1e-6 and state_fwd.stats["payload_bytes"] == stats["payload_bytes"], fwd
same = all(torch.equal(a, b) for a, b in zip(models["sparse"].module.parameters(), models["step"].module.parameters()))
print(f"in-hook step: {ad.distributed.in_hook_steps(opts['step'])} bucket steps; params bitwise equal to "
      f"the usual step: {same}")
assert ad.distributed.in_hook_steps(opts["step"]) > 0
assert same, "the optimizer step inside the hook changed the result on CUDA"
ad.distributed.finish_steps(models["overlap"])
torch.cuda.synchronize()
same = all(torch.equal(a, b) for a, b in zip(models["sparse"].module.parameters(), models["overlap"].module.parameters()))
print(f"forward overlap: {ad.distributed.in_hook_steps(opts['overlap'])} bucket steps; params bitwise equal to "
      f"the usual step: {same}")
assert ad.distributed.in_hook_steps(opts["overlap"]) > 0
assert same, "the forward overlap changed the result on CUDA"
same = all(torch.equal(a, b) for a, b in zip(models["fp16"].module.parameters(), models["sparse_fp16"].module.parameters()))
ratio16 = state16.stats["payload_bytes"] / state16.stats["dense_bytes"]
print(f"register(compress='fp16'): params bitwise equal to torch's fp16 hook: {same}; payload/dense {ratio16:.3f} "
      f"(sparse fp32 {stats['payload_bytes'] / stats['dense_bytes']:.3f})")
assert same, "the sparse hook in fp16 differs from torch's fp16 hook on CUDA"
assert state16.stats["payload_bytes"] * 2 == stats["payload_bytes"], "fp16 payload is not half the fp32 one"
dist.destroy_process_group()
EOF

step "4. approxdist-bench kernels (GPU)"
"$PYTHON" -m approxdist.bench kernels --device cuda --layouts dim1 contiguous --json "$OUT/bench_kernels_gpu.json"

step "5. pack+unpack share of a one-rank resnet50 step (the GPU side of the hook's 3% target)"
"$PYTHON" experiments/tools/hook_share.py --device cuda --model resnet50 --ratio 0.33 --batch 32 --image-size 224 \
  --json "$OUT/hook_share_resnet50_224px.json"
"$PYTHON" experiments/tools/hook_share.py --device cuda --model resnet50 --ratio 0.33 --batch 16 --image-size 32 \
  --json "$OUT/hook_share_resnet50_32px.json"

step "done: all GPU checks passed in $SECONDS s (outputs in $OUT)"
