"""Where the numbers go: one printed line per epoch, JSON lines and TensorBoard events.

Only rank 0 writes; the other ranks get a logger that does nothing, so call sites never
test the rank. TensorBoard is optional (the `tensorboard` package): without it the JSON
lines still hold every figure.
"""
import json
import os
import time


def human_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def format_epoch_line(m):
    sent, dense = m.get("payload_bytes"), m.get("dense_bytes")
    if sent is None or not dense:
        comm = f"sent {human_bytes(sent)}"
    else:
        saved = dense - sent
        comm = f"sent {human_bytes(sent)} saved {human_bytes(saved)} ({100.0 * saved / dense:.1f}% of dense)"
    return (
        f"epoch {m['epoch']}/{m['epochs']} step {m['step']} loss {m['train_loss']:.4f} "
        f"val_loss {m['val_loss']:.4f} top1 {m['top1']:.2f} top5 {m['top5']:.2f} "
        f"{m['images_per_s']:.0f} img/s {comm}"
    )


def format_eval_line(m):
    return (f"eval at step {m['step']} (epoch {m['epoch']:.2f}) val_loss {m['val_loss']:.4f} "
            f"top1 {m['top1']:.2f} top5 {m['top5']:.2f} train {m['train_seconds']:.1f} s")


class MetricsLogger:
    def __init__(self, output_dir, enabled=True):
        self.enabled = enabled
        self.jsonl = self.tb = None
        if not enabled or not output_dir:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
        except ImportError:  # tensorboard not installed: JSON lines only
            self.tb = None

    def rewind(self, step):
        """Keep only the records of steps up to ``step``, where the run (re)starts: those
        after it were made by an attempt whose later state no checkpoint holds, and the
        steps are about to run again. A fresh start rewinds to 0 (an empty file)."""
        if self.jsonl is None:
            return
        path = self.jsonl.name
        self.jsonl.close()
        kept, dropped = [], 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a killed writer
                    dropped += 1
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            tmp = path + ".rewind"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        self.jsonl = open(path, "a", encoding="utf-8")
        return dropped

    def info(self, text):
        if self.enabled:
            print(text, flush=True)

    def epoch(self, metrics):
        if not self.enabled:
            return
        self.info(format_epoch_line(metrics))
        self.write(dict(metrics, kind="epoch"))

    def evaluation(self, metrics, echo=None):
        """A mid-epoch evaluation (--eval-every): one line (through echo, e.g. tqdm's write,
        else print) and a JSON record of kind 'eval'."""
        if not self.enabled:
            return
        (echo or self.info)(format_eval_line(metrics))
        self.write(dict(metrics, kind="eval"))

    def write(self, record):
        if not self.enabled:
            return
        record = dict(record, time=time.time())
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
            self.tb.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["MetricsLogger", "format_epoch_line", "format_eval_line", "human_bytes"]
