"""Keeping every rank on the same sampled channels.

The selection is a function of the weights (and of identically seeded generators), so
ranks agree by construction; these are the checks and the fallback for when that trust
is broken (non-deterministic kernels, a rank that loaded other weights)."""
import torch
import torch.distributed as dist


class IndexMismatchError(RuntimeError):
    """Ranks selected different channels for a layer: the sparse reduction would be wrong."""


def index_digest(indices, n):
    """(count, sum(i+1), sum((i+1)^2)) of a sorted index set; (n, -1, -1) for 'all'."""
    if indices is None:
        return torch.tensor([n, -1, -1], dtype=torch.int64)
    i = indices.to(torch.int64) + 1
    return torch.stack([i.new_tensor(i.numel()), i.sum(), (i * i).sum()]).cpu()


def check_indices(state, group, layers, indices, names):
    """Compare the digests of these layers' indices across ranks (one all_reduce of MAX
    over [d, -d], so max == min means all equal); raise naming the first mismatch."""
    digests = torch.stack([index_digest(idx, layer.weight.shape[1]) for layer, idx in zip(layers, indices)])
    both = torch.cat([digests, -digests]).to(layers[0].weight.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    hi, neg_lo = both[: len(layers)], both[len(layers):]
    state.checks += 1
    for row, name in enumerate(names):
        if not torch.equal(hi[row], -neg_lo[row]):
            raise IndexMismatchError(
                f"approxdist: ranks selected different channels for layer {name!r} at step "
                f"{state.steps} (local digest {digests[row].tolist()}); the weights have diverged "
                "across ranks. Use agreement='broadcast' to follow rank 0's selection.")


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
