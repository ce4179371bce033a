"""A fine-tuning run's checkpoint: what a `FineTuner` needs to continue bit for bit where it
stopped, so that a run can span several calls (`python -m seerlib.finetune --resume`).

One safetensors file (never pickle), written atomically (`seerlib.io.atomic_write`):
- tensors: `model.<name>` the model's parameters (when the model trains), `gate.<name>` the
  gates' state (when they train), `optim.<param index>.<name>` the AdamW state of both parameter
  groups (`seerlib.io.optimizer_tensors`), `rng.cpu` (and `rng.cuda` when training on CUDA)
  torch's global generator states. The window order needs none: it is a function of the seed
  and the step (`seerlib.distill.window_order`).
- metadata (key "seerlib", JSON): the format, the run's options (those that must not change
  between calls, as the CLI names them), the `FinetuneConfig`, the model's config hash and base
  sha256, the optimizer's hyper-parameters, the LR scheduler's state, the loop state (step,
  tokens seen, the metrics history, the loss log's length in bytes at that step) and a sha256
  of the tensors.

`load_finetune_checkpoint` checks everything before it changes anything: the format, the
options and the config (each difference named with its old and new value), the model's config
hash and base weights, the checksum, every tensor's name, shape and dtype against the tuner's.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from seerlib.io import (
    GateFileError,
    _non_finite,
    _read_tensors,
    _verify_tensors,
    atomic_write,
    checked_optimizer_state,
    config_hash,
    optimizer_tensors,
    read_metadata,
    tensor_digest,
)

__all__ = ["FORMAT", "checkpoint_path", "load_finetune_checkpoint", "read_finetune_checkpoint",
           "save_finetune_checkpoint"]

FORMAT = "seerlib-finetune-checkpoint/1"
_FILE = "a fine-tuning checkpoint written by seerlib.finetune.save_finetune_checkpoint"
_FIELDS = ("options", "config", "config_hash", "base_model_sha256", "param_groups",
           "optim_scalars", "scheduler", "state", "sha256")
_STATE = ("step", "tokens_seen", "history", "log_bytes")


def checkpoint_path(out) -> Path:
    """The checkpoint of the run whose gate file is `out`: <out>.ckpt.safetensors beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".ckpt.safetensors")


def _tensors(tuner) -> dict[str, torch.Tensor]:
    """The tuner's trained tensors and generator states, as CPU tensors."""
    out = {}
    if tuner.cfg.trains_model:
        out.update({f"model.{n}": p.detach().contiguous().cpu()
                    for n, p in tuner.model.named_parameters()})
    if tuner.cfg.trains_gate:
        out.update({f"gate.{k}": v.detach().contiguous().cpu()
                    for k, v in tuner.gates.state_dict().items()})
    out["rng.cpu"] = torch.get_rng_state()
    if torch.device(tuner.device).type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(tuner.device)
    return out


def save_finetune_checkpoint(path, tuner, options: dict, base_sha256: str,
                             log_bytes: int = 0) -> dict:
    """Write the tuner's state at its current step to `path`, atomically.

    Args:
        path: the .safetensors file (parent folders are created).
        tuner: the `FineTuner`.
        options: JSON-able {name: value} of the run's options that a resumed call must repeat
            (the CLI's: {"--seq-len": 32768, ...}).
        base_sha256: `seerlib.targets.model_fingerprint` of the base model as loaded.
        log_bytes: the loss log's length in bytes after this step's line.
    Returns:
        the metadata written.
    Raises:
        ValueError: a tensor is non-finite (the run diverged); nothing is written.
    """
    opt_tensors, opt_meta = optimizer_tensors(tuner.optimizer)
    tensors = {**_tensors(tuner), **opt_tensors}
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"refusing to write checkpoint {path}: non-finite values (inf or NaN) in "
                         f"{', '.join(bad[:5])}; the training run diverged")
    meta = {
        "format": FORMAT,
        "options": options,
        "config": asdict(tuner.cfg),
        "config_hash": config_hash(tuner.model.config),
        "base_model_sha256": base_sha256,
        **opt_meta,
        "scheduler": tuner.scheduler.state_dict(),
        "state": {"step": tuner.step, "tokens_seen": tuner.tokens_seen,
                  "history": tuner.history, "log_bytes": int(log_bytes)},
        "sha256": tensor_digest(tensors),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    with atomic_write(path) as tmp:  # a killed call never leaves half a checkpoint
        save_file(tensors, str(tmp), metadata={"seerlib": json.dumps(meta, default=list)})
    return meta


def _differences(saved: dict, now: dict) -> list[str]:
    keys = list(now) + [k for k in saved if k not in now]
    return [f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in keys
            if saved.get(k) != now.get(k)]


def read_finetune_checkpoint(path, options: dict | None = None) -> dict:
    """The metadata of a checkpoint, checked: its format and fields, and when `options` is
    given, that they are the checkpointed run's.

    Raises:
        FileNotFoundError: no file at `path`.
        GateFileError (a ValueError): not a readable fine-tuning checkpoint; names the path.
        ValueError: `options` differ from the run's; names each option, its old and new value.
    """
    meta = read_metadata(path, _FILE)
    if meta.get("format") != FORMAT:
        raise GateFileError(f"{path} is not a seerlib fine-tuning checkpoint (format "
                            f"{meta.get('format')!r}); expected {_FILE} (format {FORMAT!r})")
    missing = [k for k in _FIELDS if k not in meta]
    missing += [f"state.{k}" for k in _STATE if not isinstance(meta.get("state"), dict)
                or k not in meta["state"]]
    if missing:
        raise GateFileError(f"{path} lacks the metadata fields {missing}; expected {_FILE}")
    diffs = _differences(meta["options"], options) if options is not None else []
    if diffs:
        raise ValueError(f"{path} is of a run with other options: {'; '.join(diffs)}. A resumed "
                         "run keeps the options it started with: pass the old values (or start a "
                         "new run at another --out)")
    return meta


def _check_tensor(path, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype:
        raise GateFileError(f"{path} holds {name} of shape {tuple(t.shape)} {t.dtype}; the run "
                            f"to resume has {tuple(like.shape)} {like.dtype}; expected {_FILE} "
                            "of the same model and gates")


def load_finetune_checkpoint(path, tuner, options: dict | None = None,
                             base_sha256: str | None = None) -> dict:
    """Restore a `FineTuner` (built as the checkpointed run built it) in place from `path`:
    the trained tensors, the optimizer and scheduler, the step, tokens seen and history, and
    torch's generator states. Nothing is changed if a check fails.

    Args:
        path: the checkpoint.
        tuner: the FineTuner; its config must be the checkpoint's but for `steps`, which may
            grow (not fall below the checkpoint's step).
        options: if given, the options the checkpointed run must have had.
        base_sha256: if given, the base model's fingerprint the run must have started from.
    Returns:
        the loop state: {"step", "tokens_seen", "history", "log_bytes"}.
    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: another run (options, config, model) or a damaged file; the message names
            what differs and what was expected.
    """
    meta = read_finetune_checkpoint(path, options)
    now = {k: v for k, v in asdict(tuner.cfg).items() if k != "steps"}
    diffs = _differences({k: v for k, v in meta["config"].items() if k != "steps"}, now)
    if diffs:
        raise ValueError(f"{path} is of a run with another FinetuneConfig: {'; '.join(diffs)}")
    state = meta["state"]
    if tuner.cfg.steps < state["step"]:
        raise ValueError(f"{path} is at step {state['step']}; the run to resume has steps "
                         f"{tuner.cfg.steps}; expected steps >= {state['step']}")
    have = config_hash(tuner.model.config)
    if meta["config_hash"] != have:
        raise ValueError(f"{path} was made for a model with config hash {meta['config_hash']}; "
                         f"this model's hashes to {have} (another model or YaRN factor)")
    if base_sha256 is not None and meta["base_model_sha256"] != base_sha256:
        raise ValueError(f"{path} was trained from base weights with sha256 "
                         f"{meta['base_model_sha256'][:16]}...; this model's hash to "
                         f"{base_sha256[:16]}... (another base model)")
    tensors = _read_tensors(path, what=_FILE)
    _verify_tensors(path, meta, tensors, _FILE)
    cuda = torch.device(tuner.device).type == "cuda"
    like = {"rng.cpu": torch.get_rng_state()}
    if cuda and "rng.cuda" in tensors:  # a CPU run resumed on CUDA keeps the fresh CUDA state
        like["rng.cuda"] = torch.cuda.get_rng_state(tuner.device)
    params = dict(tuner.model.named_parameters()) if tuner.cfg.trains_model else {}
    like.update({f"model.{n}": p for n, p in params.items()})
    gate_state = tuner.gates.state_dict() if tuner.cfg.trains_gate else {}
    like.update({f"gate.{k}": v for k, v in gate_state.items()})
    held = {k for k in tensors if not k.startswith("optim.") and k != "rng.cuda"}
    missing, extra = sorted(set(like) - held - {"rng.cuda"}), sorted(held - set(like))
    if missing or extra:
        raise GateFileError(f"{path} lacks {missing[:5]} and holds unexpected {extra[:5]}; "
                            f"expected {_FILE} of a run that trains {tuner.cfg.train!r}")
    for name, t in like.items():
        _check_tensor(path, name, tensors[name], t)
    optim_state = checked_optimizer_state(tuner.optimizer, tensors, meta, path, _FILE)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"model.{name}"])
    if gate_state:
        tuner.gates.load_state_dict({k: tensors[f"gate.{k}"] for k in gate_state}, strict=True)
    tuner.optimizer.load_state_dict(optim_state)
    tuner.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in like:
        torch.cuda.set_rng_state(tensors["rng.cuda"], tuner.device)
    tuner.step, tuner.tokens_seen = state["step"], state["tokens_seen"]
    tuner.history = list(state["history"])
    return state
