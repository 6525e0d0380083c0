"""A user's script that ends the PyTorch way: DDP with the sparse hook, a few steps, then
``dist.destroy_process_group()`` and return (no approxdist.distributed.shutdown_distributed).

Run one process per rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set
(tests/test_teardown.py). HOOK_WRAP=step|compress wraps the hook as register() does for
optimizer= and compress=, so each of the package's future callbacks ends a run."""
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import approxdist as ad
from approxdist.distributed import register


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 10))
    ad.convert_model(model, 0.5, distributed=True)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)  # several buckets
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    wrap = os.environ.get("HOOK_WRAP", "")
    register(ddp, optimizer=opt if wrap == "step" else None, compress="fp16" if wrap == "compress" else None)
    for _ in range(5):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
