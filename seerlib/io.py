"""Gate files and training checkpoints: safetensors plus JSON metadata, never pickle.

- `save_gates(gates, path, **info)` / `load_gates(path, model)`: a trained `GateSet` (prefill) or
  `seerlib.decode.DecodeGateSet` (decode; the metadata's `phase` says which). The metadata
  (safetensors header, key "seerlib") holds the model name, a hash of the model config's
  architecture fields, the gate configuration (block size, pooling, gate dim), the dtype the gates
  were trained in and the one they are stored in, a sha256 of the tensors, and training facts
  (tokens seen, steps, final loss, date, ...). `load_gates` refuses a file made for another model
  or block size with an error that names both sides, and a damaged file (checksum, dtype,
  non-finite weights, unreadable header) with an error that names the path.
- `save_checkpoint` / `load_checkpoint`: gates + AdamW state + scheduler + loop state, to resume
  (its optimizer part, `optimizer_tensors` / `checked_optimizer_state`, also serves others).
- `atomic_write(path)`: the one way seerlib writes a file: into a temporary file beside it, then
  `os.replace`, the temporary file removed on any failure (and, left by a killed process, on the
  next write of the same path).

Files written before the checksum existed (the first shipped gates) load as "unchecked": every
other check still applies.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seerlib.gate import GateSet

__all__ = [
    "FORMAT",
    "PHASES",
    "GateFileError",
    "atomic_write",
    "atomic_write_text",
    "checked_optimizer_state",
    "config_hash",
    "file_sha256",
    "fresh_path",
    "load_checkpoint",
    "load_gates",
    "optimizer_tensors",
    "read_metadata",
    "save_checkpoint",
    "save_gates",
    "tensor_digest",
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


class GateFileError(ValueError):
    """A gate file or checkpoint is unreadable, damaged or inconsistent; the message names it."""


# ---------------------------------------------------------------- atomic writes

_TEMP_MARK = ".part-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_path(path: Path, pid: int | None = None) -> Path:
    """A hidden temporary name beside `path` that says which process (and host) writes it."""
    pid = os.getpid() if pid is None else pid
    return path.with_name(f".{path.name}{_TEMP_MARK}{pid}-{_HOST}-{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _reap_stale_temps(path: Path) -> None:
    """Remove temporary files of `path` left by writers of this host that no longer run."""
    for tmp in path.parent.glob(f".{path.name}{_TEMP_MARK}*.tmp"):
        try:
            pid, host, _ = tmp.name[len(path.name) + 1 + len(_TEMP_MARK) : -4].split("-")
            if host == _HOST and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Write a file all at once or not at all.

    Yields a temporary path in the same folder (parent folders are created); write the whole file
    there. On a normal exit it is flushed to disk and renamed over `path` (`os.replace`, atomic on
    one file system); on any exception, KeyboardInterrupt included, it is removed and `path` is
    left as it was. Temporary files of `path` left by killed processes of this host are removed
    first.

    Use: `with atomic_write(p) as tmp: save_file(tensors, str(tmp))`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _reap_stale_temps(path)
    tmp = _temp_path(path)
    open(tmp, "xb").close()  # reserve the name; the mode follows the umask, as a plain open's
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """`Path.write_text` (UTF-8) through `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fresh_path(folder, stem: str, suffix: str = "") -> Path:
    """folder/<stem>-<UTC time><suffix> (with -2, -3, ... when taken): a path no earlier run
    wrote, for what a command writes when it is given no path (nothing committed is replaced)."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%SZ")
    folder, n = Path(folder), 1
    while (path := folder / f"{stem}-{stamp}{'' if n == 1 else f'-{n}'}{suffix}").exists():
        n += 1
    return path


# ---------------------------------------------------------------- checks


def file_sha256(path) -> str:
    """sha256 hex digest of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_storage_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") not in _FLOAT_DTYPES:
        raise ValueError(
            f"dtype must be a floating-point dtype (torch.float16, torch.bfloat16 or "
            f"torch.float32) to store gate weights in; got {dtype!r}"
        )


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [
        name
        for name, t in sorted(tensors.items())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _open_error(path, err: Exception, what: str) -> GateFileError:
    return GateFileError(
        f"{path} could not be read ({type(err).__name__}: {err}); expected {what}"
    )


def _verify_tensors(path, meta: dict, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Checksum (when the file has one) and finiteness of a file's tensors."""
    want = meta.get("sha256")
    if want is not None and tensor_digest(tensors) != want:
        raise GateFileError(
            f"{path} is damaged: its tensors do not match the checksum in its header "
            f"(sha256 {want[:16]}...); expected {what} as written. Restore or retrain it"
        )
    bad = _non_finite(tensors)
    if bad:
        raise GateFileError(
            f"{path} holds non-finite weights (inf or NaN) in {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; expected finite weights (a diverged training "
            "run?)"
        )


# ---------------------------------------------------------------- gate files

_GATE_FILE = "a safetensors file written by seerlib.io.save_gates"


def _layer_of(name: str) -> int | None:
    """The layer of a gate set's state-dict key ("gates.<layer>.<param>"), else None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "gates" and parts[1].isdigit() else None


def save_gates(gates: GateSet, path, dtype: torch.dtype | None = None,
               layers: Sequence[int] | None = None, **info) -> dict:
    """Write a gate set to a safetensors file with its metadata, atomically.

    Args:
        gates: the GateSet.
        path: file path (.safetensors); parent folders are created.
        dtype: store weights in this floating-point dtype (e.g. torch.float16 to halve the file);
            default as trained.
        layers: store only these layers' gates (those SeerAttention applies to: Gemma 3's 3
            global layers of 18), recorded as `saved_layers`; default every layer.
        **info: JSON-able training facts to record, e.g. tokens_seen, steps, final_loss, command.
    Returns:
        the metadata dict written.
    Raises:
        ValueError: `dtype` is not a floating-point dtype, or a weight is non-finite (as trained,
            or after the cast to `dtype`); nothing is written then.
    """
    if dtype is not None:
        _check_storage_dtype(dtype)
    path = Path(path)
    trained = {name: t.detach() for name, t in gates.state_dict().items()}
    if layers is not None:
        layers = sorted({int(i) for i in layers})
        if not layers or not all(0 <= i < len(gates) for i in layers):
            raise ValueError(f"layers must be a non-empty subset of 0..{len(gates) - 1}; got "
                             f"{layers}")
        trained = {k: t for k, t in trained.items() if _layer_of(k) in layers}
        info = {**info, "saved_layers": layers}
    bad = _non_finite(trained)
    if bad:
        raise ValueError(
            f"refusing to save gates with non-finite weights (inf or NaN) in {', '.join(bad[:5])}"
            f" to {path}; the training run diverged (try a lower learning rate)"
        )
    train_dtype = next(iter(trained.values())).dtype
    tensors = {
        name: (t.to(dtype) if dtype is not None else t).contiguous().cpu()
        for name, t in trained.items()
    }
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(
            f"refusing to save gates to {path}: weights in {', '.join(bad[:5])} become non-finite "
            f"in {str(dtype).removeprefix('torch.')} (outside its range); store them in a wider "
            "dtype"
        )
    meta = {
        "format": FORMAT,
        "model_name": gates.model_name,
        "config_hash": config_hash(gates.config),
        "num_layers": len(gates),
        "num_heads": gates[0].num_heads,
        "num_kv_heads": gates[0].num_kv_heads,
        "head_dim": gates[0].head_dim,
        "phase": getattr(gates, "phase", "prefill"),  # which step the gates serve
        **gates.gate_config(),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "train_dtype": str(train_dtype).removeprefix("torch."),
        "sha256": tensor_digest(tensors),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **info,
    }
    blob = json.dumps(meta)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"seerlib": blob})
    return meta


def read_metadata(path, what: str = _GATE_FILE) -> dict:
    """The metadata dict of a file seerlib wrote (`what`: the kind expected, for the errors).

    Raises:
        FileNotFoundError: no file at `path`.
        GateFileError (a ValueError): the file is not a readable safetensors file with seerlib
            metadata; the message names the path and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {'gate file' if what == _GATE_FILE else 'file'} at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("seerlib")
    except Exception as e:  # safetensors raises its own error types, or OSError
        raise _open_error(path, e, what) from e
    if raw is None:
        raise GateFileError(f"{path} has no seerlib metadata; expected {what}")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise GateFileError(f"{path} has unreadable seerlib metadata ({e}); expected {what}") from e
    if not isinstance(meta, dict):
        raise GateFileError(f"{path} has seerlib metadata of type {type(meta).__name__}; "
                            f"expected a JSON object, as in {what}")
    return meta


def _read_tensors(path, prefix: str = "", what: str = _GATE_FILE) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k[len(prefix) :]: f.get_tensor(k)
                for k in f.keys()
                if k.startswith(prefix)  # noqa: SIM118
            }
    except Exception as e:
        raise _open_error(path, e, what) from e


# the metadata fields a gate file of each phase must have ("phase" is absent from prefill files
# written before decode gates existed)
_GATE_FIELDS = {
    "prefill": ("config_hash", "model_name", "block_size", "q_pool", "k_pool", "d_gate",
                "q_linear"),
    "decode": ("config_hash", "model_name", "block_size", "k_pool", "d_gate"),
}
PHASES = tuple(_GATE_FIELDS)


def load_gates(
    path,
    model,
    block_size: int | None = None,
    model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    phase: str | None = None,
):
    """Load a gate set saved by `save_gates` for `model`, refusing a mismatch or a damaged file.

    Checked: the format; the model (config hash, name) and block size; the tensors against the
    header's sha256 (files written before the checksum existed load unchecked); the stored dtype
    against the header's, and the training dtype is a floating-point one; every weight finite.

    Args:
        path: the .safetensors file.
        model: the transformers model (or its config) the gates will run on.
        block_size: if given, the block size the caller expects; a file of another one is refused.
        model_name: if given, the model name the caller expects (e.g. seerlib.data.MODEL_NAME).
        dtype: parameter dtype of the returned gates.
        phase: if given, the phase the caller expects ("prefill": a `GateSet`, "decode": a
            `seerlib.decode.DecodeGateSet`); a file of the other phase is refused.
    Returns:
        GateSet (prefill) or DecodeGateSet (decode) in eval mode with the file's weights.
    Raises:
        FileNotFoundError: no file at `path`.
        GateFileError (a ValueError): the file is unreadable or damaged (message names the path).
        ValueError: the file was made for another model (config hash or name) or block size.
    """
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise GateFileError(f"{path} has format {meta.get('format')!r}; expected {FORMAT!r}")
    file_phase = meta.get("phase", "prefill")
    if file_phase not in PHASES:
        raise GateFileError(f"{path} says its gates serve phase {file_phase!r}; expected one of "
                            f"{PHASES}")
    if phase is not None and phase != file_phase:
        raise ValueError(f"{path} holds {file_phase} gates; expected {phase} gates "
                         f"(phase={phase!r})")
    missing = [k for k in _GATE_FIELDS[file_phase] if k not in meta]
    if missing:
        raise GateFileError(
            f"{path} lacks the metadata fields {missing}; expected {_GATE_FILE}"
        )
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
    train_dtype = meta.get("train_dtype")
    if train_dtype is not None and train_dtype not in _FLOAT_DTYPES:
        raise GateFileError(
            f"{path} says its gates were trained in {train_dtype!r}; expected one of "
            f"{_FLOAT_DTYPES}"
        )
    tensors = _read_tensors(path)
    stored = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    if meta.get("dtype") is not None and stored != {meta["dtype"]}:
        raise GateFileError(
            f"{path} holds tensors stored as {', '.join(sorted(stored))} but its header says "
            f"{meta['dtype']}; expected {_GATE_FILE}"
        )
    _verify_tensors(path, meta, tensors, _GATE_FILE)
    if file_phase == "decode":
        # lazy: seerlib.decode imports this module (its generation path reads gate files)
        from seerlib.decode.gate import DecodeGateSet

        gates = DecodeGateSet.from_config(config, block_size=meta["block_size"],
                                          k_pool=meta["k_pool"], d_gate=meta["d_gate"],
                                          model_name=meta["model_name"])
    else:
        gates = GateSet.from_config(
            config,
            block_size=meta["block_size"],
            q_pool=meta["q_pool"],
            k_pool=meta["k_pool"],
            d_gate=meta["d_gate"],
            q_linear=meta["q_linear"],
            model_name=meta["model_name"],
        )
    saved = meta.get("saved_layers")
    try:
        if saved is None:
            gates.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
        else:  # only these layers' gates were stored; the others stay unused (and untrained)
            missing, unexpected = gates.load_state_dict(
                {k: v.to(dtype) for k, v in tensors.items()}, strict=False)
            wrong = [k for k in missing if _layer_of(k) in saved] + list(unexpected)
            wrong += [f"layer {i}" for i in saved
                      if not any(_layer_of(k) == i for k in tensors)]
            if wrong:
                raise RuntimeError(f"saved_layers {saved} but missing or extra: {wrong[:5]}")
    except RuntimeError as e:
        raise GateFileError(
            f"{path} holds tensors that do not fit the gates its header describes ({e}); "
            f"expected {_GATE_FILE}"
        ) from e
    return gates.to(dtype).eval()


# ---------------------------------------------------------------- checkpoints

_CHECKPOINT = "a training checkpoint written by seerlib.io.save_checkpoint"


def optimizer_tensors(optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state for a safetensors file: ({prefix<param index>.<name>: CPU tensor},
    JSON-able {"param_groups": hyper-parameters, "optim_scalars": non-tensor state})."""
    opt, tensors, scalars = optimizer.state_dict(), {}, {}
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}{pid}.{name}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = val
    return tensors, {"param_groups": opt["param_groups"], "optim_scalars": scalars}


def checked_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], meta: dict, path,
                            what: str, prefix: str = "optim.") -> dict:
    """The state dict for `optimizer.load_state_dict` rebuilt from `optimizer_tensors`' output
    (read back from `path`); changes nothing. Raises GateFileError, naming what differs, unless
    the groups have `optimizer`'s sizes and each non-scalar state tensor its parameter's shape."""
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})}
              for g in meta["param_groups"]]  # JSON made the betas a list
    have, want = ([len(g["params"]) for g in gs] for gs in (groups, optimizer.param_groups))
    if have != want:
        raise GateFileError(f"{path} holds optimizer state for parameter groups of {have} tensors; "
                            f"the optimizer to resume has {want}; expected {what} of the same run")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for key, val in ((k, v) for k, v in tensors.items() if k.startswith(prefix)):
        pid, name = key[len(prefix) :].split(".", 1)
        param = params[int(pid)] if pid.isdigit() and int(pid) < len(params) else None
        if param is None or (val.dim() > 0 and val.shape != param.shape):
            have = "no such parameter" if param is None else f"its parameter's is {param.shape}"
            raise GateFileError(f"{path} holds optimizer state {key} of shape {val.shape}; {have};"
                                f" expected {what} of the same run")
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta["optim_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": groups}


def save_checkpoint(path, gates: GateSet, optimizer, scheduler, state: dict) -> None:
    """Everything needed to resume training, in one safetensors file, written atomically.

    Args:
        path: file path.
        gates: the GateSet being trained.
        optimizer: torch optimizer over the gate parameters (its tensors go in the file, its
            hyper-parameters in the metadata).
        scheduler: a torch LR scheduler (its state_dict must be JSON-able, as LambdaLR's is).
        state: JSON-able loop state (step, tokens seen, data order seed, history, ...).
    Raises:
        ValueError: a gate weight or optimizer tensor is non-finite (nothing is written).
    """
    path = Path(path)
    tensors = {f"gate.{k}": v.detach().contiguous().cpu() for k, v in gates.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(
            f"refusing to write checkpoint {path}: non-finite values (inf or NaN) in "
            f"{', '.join(bad[:5])}; the training run diverged"
        )
    meta = {
        "format": FORMAT + "-checkpoint",
        "gate_config": gates.gate_config(),
        "config_hash": config_hash(gates.config),
        "model_name": gates.model_name,
        **opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state,
        "sha256": tensor_digest(tensors),
    }
    blob = json.dumps(meta, default=list)
    with atomic_write(path) as tmp:  # a crash never leaves half a checkpoint
        save_file(tensors, str(tmp), metadata={"seerlib": blob})


def load_checkpoint(path, gates: GateSet, optimizer, scheduler) -> dict:
    """Restore gates, optimizer and scheduler in place from `save_checkpoint`; return the state.

    The file is checked first (format, gates, checksum, finiteness); nothing is changed in place
    if it fails.
    """
    meta = read_metadata(path, _CHECKPOINT)
    if meta.get("format") != FORMAT + "-checkpoint":
        raise GateFileError(
            f"{path} is not a seerlib training checkpoint (format {meta.get('format')!r}); "
            f"expected {_CHECKPOINT}"
        )
    missing = [k for k in ("gate_config", "config_hash", "param_groups", "optim_scalars",
                           "scheduler", "state") if k not in meta]
    if missing:
        raise GateFileError(f"{path} lacks the metadata fields {missing}; expected {_CHECKPOINT}")
    if (
        meta["config_hash"] != config_hash(gates.config)
        or meta["gate_config"] != gates.gate_config()
    ):
        raise ValueError(
            f"{path} holds gates {meta['gate_config']} for config hash {meta['config_hash']}; "
            f"the gates to resume are {gates.gate_config()} for {config_hash(gates.config)}"
        )
    tensors = _read_tensors(path, what=_CHECKPOINT)
    _verify_tensors(path, meta, tensors, _CHECKPOINT)
    optim_state = checked_optimizer_state(optimizer, tensors, meta, path, _CHECKPOINT)
    gate_state = {k[5:]: v for k, v in tensors.items() if k.startswith("gate.")}
    try:
        gates.load_state_dict(gate_state, strict=True)
    except RuntimeError as e:
        raise GateFileError(f"{path} holds gate tensors that do not fit ({e}); "
                            f"expected {_CHECKPOINT}") from e
    optimizer.load_state_dict(optim_state)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return meta["state"]
