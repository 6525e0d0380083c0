"""Lightning fits, one after the other in each process, run by tests/test_integrations.py as
`python lightning_script.py OUTDIR` (Lightning's own launcher starts the second process,
devices=2 on the CPU, gloo). Each fit trains the same converted MLP on the same batches:

  sparse  SparseDDPStrategy (approxdist's hook registered on the CPU)
  stock   Lightning's DDPStrategy given the hook (ddp_comm_state=, ddp_comm_hook=); on the
          CPU it leaves the hook out, so this run reduces with DDP's own all-reduce

Each rank saves its parameters, the hook's stats and the analytic payload per step to
OUTDIR/<fit>_rank<r>.pt, and rank 0 the CSV log of the SparseHookStats callback."""
import os
import sys

import torch
import torch.nn as nn

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import approxdist as ad  # noqa: E402
from approxdist.integrations.lightning import SparseDDPStrategy, SparseHookStats  # noqa: E402
from models import analytic_bytes, make_model  # noqa: E402

RATIO = 0.5


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ad.convert_model(make_model("mlp", seed=0), RATIO, distributed=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 32, generator=g), torch.randint(0, 5, (48,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def fit(name, strategy, outdir):
    torch.set_num_threads(1)
    model = Classifier()
    init = [p.detach().clone() for p in model.net.parameters()]
    stats = SparseHookStats(every_n_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1,
                        logger=CSVLogger(outdir, name=name, version=0), callbacks=[stats],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(model, data())
    state = getattr(strategy, "sparse_state", None) or strategy._ddp_comm_state
    torch.save({"params": [p.detach().clone() for p in model.net.parameters()],
                "stats": state.stats if state is not None else None,
                "logged": stats.last, "init": init,
                "global_step": trainer.global_step,
                "analytic": analytic_bytes(model.net),
                "dense": sum(p.numel() * p.element_size() for p in model.net.parameters())},
               os.path.join(outdir, f"{name}_rank{trainer.global_rank}.pt"))


def main(outdir):
    fit("sparse", SparseDDPStrategy(process_group_backend="gloo"), outdir)
    fit("stock", L.strategies.DDPStrategy(process_group_backend="gloo",
                                          ddp_comm_state=ad.distributed.SparseAllReduceState(),
                                          ddp_comm_hook=ad.distributed.sparse_allreduce_hook), outdir)


if __name__ == "__main__":
    main(sys.argv[1])
