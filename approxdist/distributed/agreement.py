"""Keeping every rank on the same sampled channels.

The selection is a function of the weights (and of identically seeded generators), so
ranks agree by construction; these are the checks and the fallback for when that trust
is broken (non-deterministic kernels, a rank that loaded other weights)."""
import torch
import torch.distributed as dist


class IndexMismatchError(RuntimeError):
    """Ranks selected different channels for a layer: the sparse reduction would be wrong."""


class UnsampledGradientError(RuntimeError):
    """A sampled weight's gradient outside its layers' selected channels differs across
    ranks: something else uses the weight (a functional use outside its module), and the
    sparse hook, which sends only the selected channels, would drop that gradient."""


class PayloadSizeError(IndexMismatchError):
    """Ranks would send sparse payloads of different sizes for a bucket (found before the
    collective, which gloo would abort and NCCL would hang or misread)."""


def check_payload_sizes(state, group, sizes, names, device, scope="bucket"):
    """Compare payload sizes across ranks before they are sent: `sizes` holds the element
    count of each sampled weight's piece and, last, their total over the `scope` ("bucket":
    one bucket's payload; "step": every sampled weight of the model); one
    all_reduce(MAX) of [sizes, -sizes] (16 bytes a row, counted in state.check_bytes).
    Raises PayloadSizeError on every rank, naming the first sampled weight whose piece
    differs (names[i]) and the sizes."""
    local = torch.tensor(sizes, dtype=torch.int64)
    both = torch.cat([local, -local]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    state.check_bytes += both.numel() * both.element_size()
    both = both.cpu()
    hi, lo = both[: len(sizes)], -both[len(sizes):]  # max and min across ranks
    if torch.equal(hi, lo):
        return
    row = next(i for i in range(len(sizes)) if hi[i] != lo[i])
    what = f"layer {names[row]!r}" if row < len(names) else "a bucket's dense part"
    raise PayloadSizeError(
        f"approxdist: the sparse payload differs across ranks at step {state.steps} for {what}: "
        f"{int(local[row])} elements on this rank, {int(lo[row])} to {int(hi[row])} across ranks "
        f"(whole {scope} payload: {int(local[-1])} here, {int(lo[-1])} to {int(hi[-1])} across "
        "ranks). The ranks selected different channels: a training forward that recorded a "
        "gradient ran on some ranks only, or the weights diverged. Run the same forwards on "
        "every rank (a logging pass under torch.no_grad() is fine) or use agreement='broadcast'.")


def index_digest(indices, n):
    """(count, sum(i+1), sum((i+1)^2)) of a sorted index set; (n, -1, -1) for 'all'."""
    if indices is None:
        return torch.tensor([n, -1, -1], dtype=torch.int64)
    i = indices.to(torch.int64) + 1
    return torch.stack([i.new_tensor(i.numel()), i.sum(), (i * i).sum()]).cpu()


def outside_digest(grad, indices):
    """Two integers that equal on every rank when the gradient `grad` outside the channels
    `indices` (dim 1) is the same on every rank: the bits of its float64 sum and sum of
    squares (halved, so that negating them cannot overflow). Zeros for 'all channels'."""
    if indices is None or indices.numel() == grad.shape[1]:
        return [0, 0]
    outside = torch.ones(grad.shape[1], dtype=torch.bool, device=grad.device)
    outside[indices] = False
    v = grad[:, outside].double()
    sums = torch.stack([v.sum(), (v * v).sum()]).cpu()
    return (sums.view(torch.int64) >> 1).tolist()


def check_indices(state, group, layers, indices, names, outside=None):
    """Compare the digests of these layers' indices across ranks (one all_reduce of MAX
    over [d, -d], so max == min means all equal); raise naming the first mismatch.
    outside: per layer, outside_digest of its gradient; it rides in the same all_reduce,
    and where it differs across ranks every rank raises UnsampledGradientError."""
    digests = torch.stack([index_digest(idx, layer.weight.shape[1]) for layer, idx in zip(layers, indices)])
    if outside is not None:
        digests = torch.cat([digests, torch.tensor(outside, dtype=torch.int64).view(-1, 2)], dim=1)
    both = torch.cat([digests, -digests]).to(layers[0].weight.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    state.check_bytes += both.numel() * both.element_size()
    both = both.cpu()
    hi, neg_lo = both[: len(layers)], both[len(layers):]
    state.checks += 1
    for row, name in enumerate(names):
        if not torch.equal(hi[row, :3], -neg_lo[row, :3]):
            raise IndexMismatchError(
                f"approxdist: ranks selected different channels for layer {name!r} at step "
                f"{state.steps} (local digest {digests[row].tolist()}; channels: "
                f"{int(digests[row][0])} on this rank, {int(-neg_lo[row][0])} to {int(hi[row][0])} "
                "across ranks); the weights have diverged across ranks, or a training forward "
                "that recorded a gradient ran on some ranks only. Use agreement='broadcast' to "
                "follow rank 0's selection.")
    for row, name in enumerate(names):
        if not torch.equal(hi[row, 3:], -neg_lo[row, 3:]):
            raise UnsampledGradientError(
                f"approxdist: the gradient of layer {name!r} outside its sampled channels differs "
                f"across ranks at step {state.steps}: the weight is also used outside its sampled "
                "layers (e.g. F.linear(x, layer.weight)), and the sparse hook would drop that "
                "gradient. Exclude the layer from convert_model (exclude=[...]) or use the weight "
                "through the layer only.")


def install_broadcast(layer, group):
    """Make `layer` use rank 0's selection in every training forward."""
    src = dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0

    def sync(layer, idx, scale):
        n = layer.weight.shape[1]
        vec = torch.zeros(n, dtype=torch.float64, device=layer.weight.device)
        if idx is None:
            vec.fill_(1.0)
        else:
            vec[idx] = scale.to(torch.float64) if scale is not None else 1.0
        dist.broadcast(vec, src=src, group=group)
        chosen = vec.nonzero().squeeze(1)
        scaled = layer.policy == "bernoulli_weight"  # the top-k policies keep channels unscaled
        if chosen.numel() == n and (not scaled or bool((vec == 1).all())):
            return None, None  # every channel unscaled: the exact forward (an exact step, k == n)
        return chosen, (vec[chosen] if scaled else None)

    layer._index_sync = sync
