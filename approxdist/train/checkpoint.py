"""Training checkpoints: written atomically, read with ``weights_only=True``, validated in
full before anything is loaded.

Why each rule:
- atomic (temporary file in the same folder, fsync, ``os.replace``): a job killed while
  writing, which is exactly what an elastic restart is about, must find the previous
  checkpoint intact rather than half a file;
- ``weights_only=True``: a checkpoint is data, and unpickling arbitrary objects from a
  shared file system is code execution, so everything stored is tensors and plain
  containers of numbers and strings;
- validate first: a checkpoint of another model or a corrupt file must leave the model,
  optimizer and scheduler exactly as they were, so the error is the only effect.
"""
import os
import tempfile

import torch

FORMAT = "approxdist-train/1"
LATEST = "checkpoint.pt"
METRICS = "metrics.jsonl"
_TMP_PREFIX, _TMP_SUFFIX = ".tmp-", ".pt"


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used; nothing has been loaded."""


_PLAIN = (int, float, str, bool, type(None), torch.Tensor)


def to_plain(obj, where="checkpoint"):
    """Check (recursively) that ``obj`` is weights_only-safe, naming the first field that is not,
    so a bad field fails at save time rather than when someone needs the checkpoint."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, torch.Size):
        return list(obj)
    raise TypeError(f"{where}: {type(obj).__name__} is not weights_only-safe")


def save_atomic(payload, path):
    """Write ``payload`` to ``path`` so that ``path`` is always either the old or the new file."""
    payload = to_plain(payload)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every file system allows opening a folder
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def remove_stale_temps(folder):
    """Delete the temporary files of saves that never finished (a process killed between
    mkstemp and os.replace leaves one, often of 0 bytes); returns their names. Call it at
    startup, before this run saves: one run owns its output folder."""
    if not folder or not os.path.isdir(folder):
        return []
    stale = sorted(f for f in os.listdir(folder) if f.startswith(_TMP_PREFIX) and f.endswith(_TMP_SUFFIX))
    for name in stale:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    return stale


def existing_run(folder):
    """The files of a previous run in ``folder`` (a checkpoint, metrics), or []."""
    if not folder:
        return []
    return [f for f in (LATEST, METRICS) if os.path.exists(os.path.join(folder, f))]


def read(path):
    """Load a checkpoint file into plain data, or raise CheckpointError saying why not."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a weights-only checkpoint: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not an approxdist-train checkpoint (format {FORMAT!r})")
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "step_in_epoch", "config"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path!r} lacks {key!r}")
    return ckpt


def validate_model_state(state, model, path="checkpoint"):
    """Keys, shapes and dtypes must match exactly; report the first few differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    if wrong:
        problems.append(f"shape mismatch {wrong[:3]}{'...' if len(wrong) > 3 else ''}")
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not fit this model: " + "; ".join(problems))


def validate_optimizer_state(state, optimizer, path="checkpoint"):
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if groups is None or "state" not in state:
        raise CheckpointError(f"checkpoint {path!r}: optimizer state is malformed")
    own = optimizer.param_groups
    if len(groups) != len(own) or any(len(g["params"]) != len(o["params"]) for g, o in zip(groups, own)):
        raise CheckpointError(f"checkpoint {path!r}: optimizer parameter groups do not match this model")
    params = [p for g in own for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    by_id = dict(zip(ids, params))
    for pid, pstate in state["state"].items():
        p = by_id.get(pid)
        if p is None:
            raise CheckpointError(f"checkpoint {path!r}: optimizer state for unknown parameter {pid}")
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise CheckpointError(
                    f"checkpoint {path!r}: optimizer {name!r} of parameter {pid} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                )


def validate_config(saved, current, keys, path="checkpoint"):
    diffs = [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path!r} was made with a different setup: " + ", ".join(diffs))


__all__ = [
    "FORMAT",
    "LATEST",
    "METRICS",
    "remove_stale_temps",
    "existing_run",
    "CheckpointError",
    "save_atomic",
    "read",
    "to_plain",
    "validate_model_state",
    "validate_optimizer_state",
    "validate_config",
]
