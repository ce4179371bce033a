"""Gate files and training checkpoints: safetensors plus JSON metadata, never pickle.

- `save_gates(gates, path, **info)` / `load_gates(path, model)`: a trained `GateSet`. The metadata
  (safetensors header, key "seerlib") holds the model name, a hash of the model config's
  architecture fields, the gate configuration (block size, pooling, gate dim), and training facts
  (tokens seen, steps, final loss, date, ...). `load_gates` refuses a file made for another model
  or block size with an error that names both sides.
- `save_checkpoint` / `load_checkpoint`: gates + AdamW state + scheduler + loop state, to resume.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seerlib.gate import GateSet

__all__ = [
    "FORMAT",
    "config_hash",
    "load_checkpoint",
    "load_gates",
    "read_metadata",
    "save_checkpoint",
    "save_gates",
]

FORMAT = "seerlib-gates/1"

# The config fields that decide what a gate sees; names, dtypes and versions are left out.
_ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
)


def config_hash(config) -> str:
    """sha256 (first 16 hex digits) of a transformers config's architecture fields."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = {key: d.get(key) for key in _ARCH_FIELDS if d.get(key) is not None}
    blob = json.dumps(arch, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def save_gates(gates: GateSet, path, dtype: torch.dtype | None = None, **info) -> dict:
    """Write a gate set to a safetensors file with its metadata.

    Args:
        gates: the GateSet.
        path: file path (.safetensors); parent folders are created.
        dtype: store weights in this dtype (e.g. torch.float16 to halve the file); default as is.
        **info: JSON-able training facts to record, e.g. tokens_seen, steps, final_loss, command.
    Returns:
        the metadata dict written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None else t.detach()).contiguous().cpu()
        for name, t in gates.state_dict().items()
    }
    meta = {
        "format": FORMAT,
        "model_name": gates.model_name,
        "config_hash": config_hash(gates.config),
        "num_layers": len(gates),
        "num_heads": gates[0].num_heads,
        "num_kv_heads": gates[0].num_kv_heads,
        "head_dim": gates[0].head_dim,
        **gates.gate_config(),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **info,
    }
    save_file(tensors, str(path), metadata={"seerlib": json.dumps(meta)})
    return meta


def read_metadata(path) -> dict:
    """The metadata dict of a gate file or checkpoint written by this module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gate file at {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("seerlib")
    if raw is None:
        raise ValueError(f"{path} has no seerlib metadata; expected a file written by save_gates")
    return json.loads(raw)


def _read_tensors(path, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {
            k[len(prefix) :]: f.get_tensor(k)
            for k in f.keys()
            if k.startswith(prefix)  # noqa: SIM118
        }


def load_gates(
    path,
    model,
    block_size: int | None = None,
    model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> GateSet:
    """Load a gate set saved by `save_gates` for `model`, refusing a mismatch.

    Args:
        path: the .safetensors file.
        model: the transformers model (or its config) the gates will run on.
        block_size: if given, the block size the caller expects; a file of another one is refused.
        model_name: if given, the model name the caller expects (e.g. seerlib.data.MODEL_NAME).
        dtype: parameter dtype of the returned gates.
    Returns:
        GateSet in eval mode with the file's weights.
    Raises:
        ValueError: the file was made for another model (config hash or name) or block size.
    """
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; expected {FORMAT!r}")
    config = _config_of(model)
    have = config_hash(config)
    if meta["config_hash"] != have:
        raise ValueError(
            f"{path} was made for model {meta['model_name']!r} with config hash "
            f"{meta['config_hash']}; this model's config hashes to {have} (another architecture)"
        )
    if model_name is not None and meta["model_name"] and meta["model_name"] != model_name:
        raise ValueError(
            f"{path} was made for model {meta['model_name']!r}; expected {model_name!r}"
        )
    if block_size is not None and meta["block_size"] != block_size:
        raise ValueError(
            f"{path} was trained at block size {meta['block_size']}; expected {block_size}"
        )
    gates = GateSet.from_config(
        config,
        block_size=meta["block_size"],
        q_pool=meta["q_pool"],
        k_pool=meta["k_pool"],
        d_gate=meta["d_gate"],
        q_linear=meta["q_linear"],
        model_name=meta["model_name"],
    )
    state = {k: v.to(dtype) for k, v in _read_tensors(path).items()}
    gates.load_state_dict(state, strict=True)
    return gates.to(dtype).eval()


def save_checkpoint(path, gates: GateSet, optimizer, scheduler, state: dict) -> None:
    """Everything needed to resume training, in one safetensors file.

    Args:
        path: file path.
        gates: the GateSet being trained.
        optimizer: torch optimizer over the gate parameters (its tensors go in the file, its
            hyper-parameters in the metadata).
        scheduler: a torch LR scheduler (its state_dict must be JSON-able, as LambdaLR's is).
        state: JSON-able loop state (step, tokens seen, data order seed, history, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"gate.{k}": v.detach().contiguous().cpu() for k, v in gates.state_dict().items()}
    opt = optimizer.state_dict()
    opt_scalars = {}
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{name}"] = val.detach().contiguous().cpu()
            else:
                opt_scalars[f"{pid}.{name}"] = val
    meta = {
        "format": FORMAT + "-checkpoint",
        "gate_config": gates.gate_config(),
        "config_hash": config_hash(gates.config),
        "model_name": gates.model_name,
        "param_groups": opt["param_groups"],
        "optim_scalars": opt_scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"seerlib": json.dumps(meta, default=list)})
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path, gates: GateSet, optimizer, scheduler) -> dict:
    """Restore gates, optimizer and scheduler in place from `save_checkpoint`; return the state."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT + "-checkpoint":
        raise ValueError(
            f"{path} is not a seerlib training checkpoint (format {meta.get('format')!r})"
        )
    if (
        meta["config_hash"] != config_hash(gates.config)
        or meta["gate_config"] != gates.gate_config()
    ):
        raise ValueError(
            f"{path} holds gates {meta['gate_config']} for config hash {meta['config_hash']}; "
            f"the gates to resume are {gates.gate_config()} for {config_hash(gates.config)}"
        )
    gates.load_state_dict(_read_tensors(path, "gate."), strict=True)
    opt_tensors = _read_tensors(path, "optim.")
    st: dict = {}
    for key, val in opt_tensors.items():
        pid, name = key.split(".", 1)
        st.setdefault(int(pid), {})[name] = val
    for key, val in meta["optim_scalars"].items():
        pid, name = key.split(".", 1)
        st.setdefault(int(pid), {})[name] = val
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": st, "param_groups": groups})
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return meta["state"]
