"""`--model-ema`: an exponential moving average of the weights, evaluated beside the model.

torchvision's references/classification keeps one (`ExponentialMovingAverage`, an
AveragedModel over parameters and buffers): every --model-ema-steps steps

    ema = decay * ema + (1 - decay) * model        (the first update copies the model)

with decay = 1 - min(1, (1 - --model-ema-decay) * world_size * batch_size * ema_steps / epochs),
and during the warm-up epochs every update copies. The same here, with one difference:
the average lives in a plain model of the same architecture (torch.nn layers, no sampling)
and is updated from the trained model's state_dict, whose keys and values are those of the
plain model (the contract of `convert_model`). So the averaged weights never pass through a
sampled layer's weight layout, and evaluating them is exactly what torch.nn computes.
Integer buffers (BatchNorm's num_batches_tracked) are copied, not averaged.
"""
import torch


def ema_decay(model_ema_decay, world_size, batch_size, ema_steps, epochs):
    """torchvision's adjustment of --model-ema-decay to the samples between two updates."""
    alpha = 1.0 - model_ema_decay
    alpha = min(1.0, alpha * world_size * batch_size * ema_steps / epochs)
    return 1.0 - alpha


class ModelEMA:
    """The average (`module`, a plain model in eval use) and how many updates it holds."""

    def __init__(self, module, decay):
        self.module, self.decay = module, float(decay)
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model, copy=False):
        """Fold `model`'s current weights in (or copy them: the first update, warm-up)."""
        source = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = source[name].to(avg.device)
            if copy or self.updates == 0 or not avg.is_floating_point():
                avg.copy_(value)
            else:
                avg.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
        self.updates = 0 if copy else self.updates + 1

    def state_dict(self):
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"], strict=True)
        self.updates = int(state["updates"])


__all__ = ["ModelEMA", "ema_decay"]
