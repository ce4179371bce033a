"""The evaluation's cache of ground-truth attention maps (`evaluate(..., cache=folder)`,
`python -m seerlib.eval --cache`): the dense pass's per-layer maps of one window, so that a rerun
skips the slow part.

One safetensors file per window, `maps-S<len>-w<index>-o<offset>-b<block>.safetensors`, with the
tensors `L<layer>.max` and `L<layer>.sum` ((1, Hq, nb, nb), as `dense_pass` returns them) and a
header (key "seerlib") that says what they were computed from: the format version, the model
(name, a hash of its config's architecture fields, a sha256 of its weights, dtype, device type,
and its attention logit soft-cap when it has one: Gemma2's maps are of the soft-capped attention),
the window (sha256 of its token ids, length, index, offset), the block size and the layer and
head counts, plus a sha256 of the tensors. Written through `seerlib.io.atomic_write`.

A cached file is used only when every field of its header equals this run's and its tensors are
complete, finite and match their checksum; otherwise `cached_maps` says why and returns None, and
`evaluate` computes the maps again and replaces the file. Caches of the old format (pickled
`.pt` files, which recorded nothing of their source) are never opened: the first write of a
window removes its `.pt`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seerlib.families import family_of
from seerlib.io import atomic_write, config_hash, tensor_digest
from seerlib.targets import model_fingerprint

__all__ = ["FORMAT", "POOLS", "MapsCacheError", "cached_maps", "load_maps", "maps_key",
           "maps_path", "model_key", "save_maps"]

FORMAT = "seerlib-eval-maps/1"
POOLS = ("max", "sum")  # the maps `dense_pass` computes per layer
_META = "seerlib"


class MapsCacheError(ValueError):
    """A cached maps file is unreadable, damaged, incomplete or made from other inputs."""


def model_key(model) -> dict[str, str]:
    """What the maps depend on in the model (computed once per run: the weights are hashed)."""
    p = next(model.parameters())
    c = model.config
    name = Path(str(getattr(c, "_name_or_path", "") or c.model_type)).name  # not where it lies
    key = {"model": name,
           "config_hash": config_hash(c), "weights_sha256": model_fingerprint(model),
           "dtype": str(p.dtype).removeprefix("torch."), "device": p.device.type,
           "layers": str(c.num_hidden_layers), "heads": str(c.num_attention_heads)}
    cap = family_of(model).softcapping(c)
    if cap is not None:  # maps of the soft-capped attention; files written without it are stale
        key["softcap"] = str(float(cap))
    return key


def maps_key(model_fields: dict[str, str], ids: torch.Tensor, index: int, offset: int,
             block_size: int) -> dict[str, str]:
    """The full header of one window's maps: `model_key` fields plus the window's."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one window of shape (1, S); got {tuple(ids.shape)}")
    tokens = hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return {"format": FORMAT, **model_fields, "tokens_sha256": tokens.hexdigest(),
            "seq_len": str(ids.shape[1]), "window": str(index), "offset": str(offset),
            "block_size": str(block_size), "pools": ",".join(POOLS)}


def maps_path(cache, length: int, index: int, offset: int, block_size: int) -> Path:
    return Path(cache) / f"maps-S{length}-w{index}-o{offset}-b{block_size}.safetensors"


def _old_path(path: Path) -> Path:
    return path.with_suffix(".pt")  # the pickle format's name for the same window


def save_maps(path, maps: dict, key: dict[str, str]) -> None:
    """Write one window's maps ({layer: {pool: tensor}}) with `key` and their checksum."""
    path = Path(path)
    tensors = {f"L{layer}.{pool}": t.detach().cpu().contiguous()
               for layer, pools in sorted(maps.items()) for pool, t in pools.items()}
    meta = {**key, "sha256": tensor_digest(tensors)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta, sort_keys=True)})
    _old_path(path).unlink(missing_ok=True)  # never read; the new file replaces it


def load_maps(path, key: dict[str, str], device="cpu") -> dict:
    """One window's maps, checked against `key` (the header this run would write).

    Returns:
        {layer: {"max": (1, Hq, nb, nb), "sum": ...}} on `device`.
    Raises:
        MapsCacheError: unreadable (cut short, not a safetensors file), made from other inputs
        (the message names the first field that differs), incomplete, non-finite or damaged.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors' own errors, OSError, a missing or bad header
        raise MapsCacheError(f"{path} could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise MapsCacheError(f"{path} has a header of type {type(meta).__name__}, not a dict")
    for field, want in key.items():
        if meta.get(field) != want:
            raise MapsCacheError(f"{path} was computed with {field} {meta.get(field)!r}; this "
                                 f"run has {want!r}")
    layers, heads = int(key["layers"]), int(key["heads"])
    nb = math.ceil(int(key["seq_len"]) / int(key["block_size"]))
    names = {f"L{layer}.{pool}" for layer in range(layers) for pool in POOLS}
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        raise MapsCacheError(f"{path} is incomplete: it holds {len(tensors)} of the {len(names)} "
                             f"maps (missing {missing[:3]}, extra {extra[:3]})")
    shape = (1, heads, nb, nb)
    for name, t in sorted(tensors.items()):
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise MapsCacheError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}; expected a "
                                 f"float map of shape {shape}")
        if not bool(torch.isfinite(t).all()):
            raise MapsCacheError(f"{path}: {name} holds inf or NaN")
    if tensor_digest(tensors) != meta.get("sha256"):
        raise MapsCacheError(f"{path} is damaged: its tensors do not match the checksum in its "
                             "header")
    return {layer: {pool: tensors[f"L{layer}.{pool}"].to(device) for pool in POOLS}
            for layer in range(layers)}


def cached_maps(path, key: dict[str, str], device="cpu", log=None) -> dict | None:
    """`load_maps`, or None when there is no usable file: missing, or refused (then `log` gets a
    line saying why it will be rebuilt). An old pickled `.pt` cache beside it is never opened."""
    path = Path(path)
    if not path.exists():
        if log is not None and _old_path(path).exists():
            log(f"maps cache {_old_path(path).name}: an old pickle cache, not read; computing the "
                f"maps again into {path.name}")
        return None
    try:
        return load_maps(path, key, device)
    except MapsCacheError as e:
        if log is not None:
            log(f"maps cache: not using it, computing the maps again ({e})")
        return None
