"""The distillation targets, computed once per text window and cached: the gates' inputs
(block-pooled pre-RoPE Q/K features: avg, max and min, so any pooling config trains from one cache)
and their target (the block max-pooled attention map of post-RoPE Q, K). The base model is frozen
and neither depends on the gates, so the model runs once per window (`build_cache`) and
`seerlib.distill` trains over `WindowCache` with no model in the loop.

Ground-truth source (`target`, SEERATTENTION.md §3):
- "kernel" (default on CUDA): the forward's attention runs through `seerlib.ops.pooled_attention`
  (the Triton kernel, bf16 inputs on CUDA), which returns the attention output and the pooled map
  in one pass: the paper's cheap extraction, no second attention pass. On CPU the same op goes to
  the reference (or to the kernels under `ops.use_backend("triton")`) in the model's dtype.
- "exact" (default on CPU): the model's own attention (SDPA) plus `metrics.block_maps`, the exact
  fp32 map. The two agree to about 1e-6 in fp32 (tested) and to bf16 rounding on a GPU.
Both take the model's attention logit soft-cap (Gemma2's `softcap`, which the model passes to its
attention function), so the target is the soft-capped attention the model computes.

Cache files: <cache root>/distill/<model>-<config hash>-b<block>-s<seq>-<split>[<target tag>]/
w<index>.safetensors with keys L<layer>.q_<op>, L<layer>.k_<op> ((1, H, nb, d) float16) and
L<layer>.pooled ((1, Hq, nb, nb) float32); the header records the block size, the window length,
the target and a sha256 of the tensors. The target tag is empty for "exact" (every cache made
before the option was exact) and "-tkernel-<dtype>" for "kernel", so caches of different sources
never mix; `WindowCache` also refuses files of mixed targets or settings.

Every window is checked when it is read: `build_cache` rebuilds a damaged one (cut short, a flipped
byte, another setting's) instead of keeping it, and `WindowCache` refuses one with an error that
names the file. Windows written before the checksum existed are checked for their settings and
their tensors only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from seerlib import ops
from seerlib.capture import attention_override, pre_rope_hooks
from seerlib.data import DataError, cache_dir
from seerlib.families import family_of
from seerlib.gate import POOL_OPS, pool_blocks
from seerlib.io import atomic_write, config_hash, tensor_digest
from seerlib.metrics import block_maps, normalize_rows
from seerlib.reference import decode_block_truth

__all__ = [
    "TARGETS",
    "WindowCache",
    "build_cache",
    "cache_folder",
    "capture_decode_targets",
    "capture_features",
    "decode_target_source",
    "default_target",
    "model_fingerprint",
    "read_window",
    "target_dtype",
    "window_features",
]

TARGETS = ("kernel", "exact")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes: proves the base model was not changed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_target(device) -> str:
    """The ground-truth source used when none is given: "kernel" on CUDA, else "exact"."""
    return "kernel" if torch.device(device).type == "cuda" else "exact"


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    return target


def decode_target_source(pooling: str, target: str | None, device) -> str:
    """The source of a decode target of `pooling` ("max" or "mass"): `target`, or when None
    "exact" for mass (the kernel emits the max-pooled target only) and `default_target(device)`
    for max. ValueError for another pooling, an unknown target, or mass from the kernel."""
    if pooling not in ("max", "mass"):
        raise ValueError(f"pooling must be 'max' or 'mass'; got {pooling!r}")
    if target is None:
        return "exact" if pooling == "mass" else default_target(device)
    if pooling == "mass" and _check_target(target) != "exact":
        raise ValueError(f"the mass target is computed by the exact reference only: pooling "
                         f"must be 'max', or 'mass' with target 'exact'; got pooling "
                         f"{pooling!r}, target {target!r}")
    return _check_target(target)


def target_dtype(target: str, device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the target is computed from: bf16 for the kernel on CUDA, else the model's."""
    if _check_target(target) == "kernel" and torch.device(device).type == "cuda":
        return torch.bfloat16
    return dtype if target == "kernel" else torch.float32


def _target_tag(target: str, device, dtype: torch.dtype) -> str:
    if _check_target(target) == "exact":
        return ""  # caches made before the option existed were exact: keep their folder name
    return f"-tkernel-{str(target_dtype(target, device, dtype)).removeprefix('torch.')}"


def cache_folder(
    model,
    model_name: str,
    block_size: int,
    seq_len: int,
    split: str,
    root=None,
    target: str | None = None,
) -> Path:
    """Where `build_cache` puts the windows of one (model, block size, seq len, split, target).

    `target` defaults to `default_target` of the model's device, as in `build_cache`.
    """
    if root is None:

        root = cache_dir()
    p = next(model.parameters())
    target = default_target(p.device) if target is None else target
    tag = f"{model_name}-{config_hash(model.config)}-b{block_size}-s{seq_len}-{split}"
    return Path(root) / "distill" / (tag + _target_tag(target, p.device, p.dtype))


@torch.no_grad()
def window_features(
    qkv: dict, block_size: int, scale: float | None = None, softcap: float | None = None
) -> dict[str, torch.Tensor]:
    """Pooled gate inputs and the pooled attention target of one captured batch.

    Args:
        qkv: {layer: LayerQKV} from `seerlib.capture.capture_qkv`.
        block_size: b.
        scale: attention score scale (the model's; 1 / sqrt(d) by default).
        softcap: the model's attention logit soft-cap (`families` softcapping), or None.
    Returns:
        {"L<i>.q_<op>": (B, Hq, nb, d) f16, "L<i>.k_<op>": (B, Hkv, nb, d) f16 for op in
        avg/max/min, "L<i>.pooled": (B, Hq, nb, nb) f32 from `pooled_attention`}.
    """
    out = {}
    for i, t in qkv.items():
        for op in POOL_OPS:
            out[f"L{i}.q_{op}"] = pool_blocks(t.q_pre, block_size, (op,)).half().cpu()
            out[f"L{i}.k_{op}"] = pool_blocks(t.k_pre, block_size, (op,)).half().cpu()
        # The exact map (equal to pooled_attention's, tested), without P @ V and scoring causal
        # keys only: half the reference's cost on a CPU, and exact fp32 on a GPU as well.
        _, pooled = block_maps(t.q, t.k, block_size, causal=True, scale=scale, softcap=softcap)
        out[f"L{i}.pooled"] = pooled.float().cpu()
    return out


@torch.no_grad()
def capture_features(
    model,
    input_ids: torch.Tensor,
    block_size: int,
    target: str = "exact",
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """One frozen forward that pools each layer's gate inputs and its target as it goes.

    The attention of every layer is routed through `seerlib.capture.attention_override`: with
    target "kernel" it *is* `ops.pooled_attention` (its output feeds the next layer, its pooled map
    is the target); with "exact" the model's own attention runs and `block_maps` gives the map.
    Only pooled tensors are kept, so memory does not grow with the layer count. Layers that keep
    the model's own attention under `sparsify` (sliding-window layers, `seerlib.families`) run
    it unchanged and get no features: the cache and the loss hold the global layers only.

    Args:
        model: a transformers Llama-family model (the lm head is skipped when it has `.model`).
        input_ids: (B, S) token ids, no padding (plain causal attention).
        block_size: b.
        target: "kernel" or "exact" (see the module docstring).
        scale: score scale when the model passes none (1 / sqrt(d)).
    Returns:
        the same keys as `window_features`, on the CPU.
    """

    _check_target(target)
    pre: dict = {}
    out: dict[str, torch.Tensor] = {}
    family = family_of(model)

    def attend(module, query, key, value, attention_mask, *, default, **kwargs):
        i = module.layer_idx
        p = pre.pop(i)
        if family.keeps_own_attention(model.config, i, key.shape[2]):
            # A sliding-window layer (Gemma3's 15 of 18) keeps its window under sparsify and has
            # no gate to train: its own attention runs (its window mask), and nothing is kept.
            return default(module, query, key, value, attention_mask, **kwargs)
        for op in POOL_OPS:
            out[f"L{i}.q_{op}"] = pool_blocks(p["q_pre"], block_size, (op,)).half().cpu()
            out[f"L{i}.k_{op}"] = pool_blocks(p["k_pre"], block_size, (op,)).half().cpu()
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"layer {i}: {query.shape[2]} queries against {key.shape[2]} keys; distillation "
                "expects one full causal pass (no KV cache)"
            )
        s = kwargs.get("scaling") or scale
        cap = kwargs.get("softcap")  # the model's logit soft-cap (Gemma2), None elsewhere
        if target == "exact":
            _, pooled = block_maps(query, key, block_size, causal=True, scale=s, softcap=cap)
            out[f"L{i}.pooled"] = pooled.float().cpu()
            return default(module, query, key, value, attention_mask, **kwargs)
        kd = target_dtype(target, query.device, query.dtype)
        o, pooled = ops.pooled_attention(
            query.to(kd), key.to(kd), value.to(kd), block_size, causal=True, scale=s, softcap=cap
        )
        out[f"L{i}.pooled"] = pooled.float().cpu()
        return o.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, S, Hq, d)

    with pre_rope_hooks(model, pre), attention_override(model, attend):
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    return out


def build_cache(
    model,
    windows: torch.Tensor,
    folder,
    block_size: int,
    indices: Sequence[int] | None = None,
    log=print,
    target: str | None = None,
) -> Path:
    """Run the model once per window and store its gate features; existing windows are kept.

    Args:
        model: the frozen transformers model.
        windows: (N, S) token ids.
        folder: the cache folder (see `cache_folder`, with the same target).
        block_size: b.
        indices: which windows to build (all by default; DDP ranks split them).
        log: called with a progress line per window (None for silence).
        target: ground-truth source, "kernel" or "exact" (default: `default_target` of the
            model's device).
    Returns:
        the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = next(model.parameters())
    device = p.device
    target = default_target(device) if target is None else _check_target(target)
    meta = {
        "block_size": str(block_size),
        "seq_len": str(windows.shape[1]),
        "target": target,
        "target_dtype": str(target_dtype(target, device, p.dtype)).removeprefix("torch."),
    }
    scale = (
        getattr(model.model.layers[0].self_attn, "scaling", None)
        if hasattr(model, "model")
        else None
    )
    for n in range(len(windows)) if indices is None else indices:
        path = folder / f"w{n:05d}.safetensors"
        if path.exists():
            try:
                read_window(path, expect=meta)
                continue
            except (DataError, ValueError) as e:
                if log:
                    log(f"cache {path.name}: rebuilding it ({e})")
        t0 = time.time()
        feats = capture_features(model, windows[n : n + 1].to(device), block_size, target, scale)
        with atomic_write(path) as tmp:
            save_file(feats, str(tmp), metadata={**meta, "sha256": tensor_digest(feats)})
        if log:
            log(f"cache {path.name}: {time.time() - t0:.1f}s")
    return folder


_FIX = "run build_cache (or `python -m seerlib.distill ... --cache-only`) again to rebuild it"
_SETTINGS = {"block_size": "block size", "seq_len": "window length", "target": "target"}
_WINDOW_KEYS = tuple(f"{side}_{op}" for side in ("q", "k") for op in POOL_OPS) + ("pooled",)


def _unreadable(path, e: Exception) -> DataError:
    return DataError(f"cached window {path} could not be read ({type(e).__name__}: {e}); {_FIX}")


def read_window(path, expect: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One cached window, checked: readable, every layer's full set of tensors, its checksum (when
    it has one) and, given `expect`, the settings it was built with.

    Args:
        path: a w<index>.safetensors file of `build_cache`.
        expect: {"block_size": str, "seq_len": str, "target": str} to match (any subset).
    Returns:
        (header metadata, {key: tensor}).
    Raises:
        DataError: the file is unreadable, incomplete or damaged (the message names it).
        ValueError: it was built with other settings than `expect`.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types, or OSError
        raise _unreadable(path, e) from e
    meta.setdefault("target", "exact")  # written before the target option: exact
    for key, name in _SETTINGS.items():
        if expect and key in expect and meta.get(key) != expect[key]:
            raise ValueError(
                f"cached window {path} was built with {name} {meta.get(key)}; expected "
                f"{expect[key]}"
            )
    layers = {k.split(".")[0] for k in tensors}
    want = {f"{layer}.{kind}" for layer in layers for kind in _WINDOW_KEYS}
    if not tensors or set(tensors) != want:
        raise DataError(f"cached window {path} is incomplete (it lacks "
                        f"{sorted(want - set(tensors))[:3] or 'every tensor'}); {_FIX}")
    if "sha256" in meta and tensor_digest(tensors) != meta["sha256"]:
        raise DataError(f"cached window {path} is damaged (its tensors do not match the checksum "
                        f"in its header); {_FIX}")
    return meta, tensors


class WindowCache:
    """The cached windows of one folder, read lazily from disk.

    Args:
        folder: a `build_cache` folder.
        n: use windows 0..n-1 (all present by default).
        preload: read every window into memory once (fast epochs; about 5.5 MB a window for
            SmolLM2 at 2048 tokens and block 64).
    """

    def __init__(self, folder, n: int | None = None, preload: bool = False):
        self.folder = Path(folder)
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        self._checked: set[int] = set()
        files = sorted(self.folder.glob("w*.safetensors"))
        if n is not None:
            files = [self.folder / f"w{i:05d}.safetensors" for i in range(n)]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(
                    f"{self.folder} lacks {len(missing)} of {n} windows (first: {missing[0]}); "
                    "run build_cache first"
                )
        if not files:
            raise FileNotFoundError(f"no cached windows in {self.folder}; run build_cache first")
        self.files = files
        meta, keys = self._header(files[0])
        if not all(str(meta.get(k, "")).isdigit() for k in ("block_size", "seq_len")):
            raise DataError(f"cached window {files[0]} has no block size and window length in "
                            f"its header; expected a file written by build_cache. {_FIX}")
        self.block_size = int(meta["block_size"])
        self.seq_len = int(meta["seq_len"])
        # files written before the target option carry no target: they are exact
        self.target = meta.get("target", "exact")
        self._expect = {"block_size": meta["block_size"], "seq_len": meta["seq_len"],
                        "target": self.target}
        for path in files[1:]:
            other, _ = self._header(path)
            if other.get("target", "exact") != self.target:
                raise ValueError(
                    f"{self.folder} mixes targets ({files[0].name}: {self.target}, "
                    f"{path.name}: {other.get('target', 'exact')}); one folder must hold one "
                    "ground-truth source"
                )
            for key in ("block_size", "seq_len"):
                if other.get(key) != meta[key]:
                    raise ValueError(
                        f"{self.folder} mixes settings: {path.name} was built with "
                        f"{_SETTINGS[key]} {other.get(key)}; expected {meta[key]} as in "
                        f"{files[0].name}"
                    )
        self.layers = sorted({int(k.split(".")[0][1:]) for k in keys})
        if preload:
            for n in range(len(files)):
                self._mem[n] = self._read(n)

    @staticmethod
    def _header(path: Path) -> tuple[dict, list[str]]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {}), list(f.keys())
        except Exception as e:  # safetensors raises its own error types, or OSError
            raise _unreadable(path, e) from e

    def _read(self, n: int) -> dict[str, torch.Tensor]:
        """Window n's tensors, checked in full (`read_window`): its first read here."""
        _, tensors = read_window(self.files[n], expect=self._expect)
        self._checked.add(n)
        return tensors

    def __len__(self) -> int:
        return len(self.files)

    def _add(self, parts, get, q_pool, k_pool):
        for i in self.layers:
            parts[i][0].append(torch.cat([get(f"L{i}.q_{op}") for op in q_pool], -1))
            parts[i][1].append(torch.cat([get(f"L{i}.k_{op}") for op in k_pool], -1))
            parts[i][2].append(get(f"L{i}.pooled"))

    def batch(self, indices: Sequence[int], q_pool, k_pool, device="cpu") -> dict[int, tuple]:
        """Stacked windows, per layer: (q_pooled, k_pooled, target).

        Shapes: q_pooled (n, Hq, nb, nq*d), k_pooled (n, Hkv, nb, nk*d), target (n, Hq, nb, nb).

        The target is the pooled map, row-normalized; features come back in float32.
        """
        parts: dict[int, list] = {i: [[], [], []] for i in self.layers}
        for n in indices:
            if n in self._mem or n not in self._checked:
                window = self._mem[n] if n in self._mem else self._read(n)
                self._add(parts, window.__getitem__, q_pool, k_pool)
                continue
            try:  # checked already: read only the tensors this pooling needs
                with safe_open(str(self.files[n]), framework="pt") as f:
                    self._add(parts, f.get_tensor, q_pool, k_pool)
            except Exception as e:  # changed on disk since
                raise _unreadable(self.files[n], e) from e
        return {
            i: (
                torch.cat(q).float().to(device),
                torch.cat(k).float().to(device),
                normalize_rows(torch.cat(t)).to(device),
            )
            for i, (q, k, t) in parts.items()
        }


# ---------------------------------------------------------------- decode gates (SeerAttention-R)


@torch.no_grad()
def capture_decode_targets(model, input_ids: torch.Tensor, block_size: int, rows: torch.Tensor,
                           target: str = "exact", scale: float | None = None,
                           pooling: str = "max") -> dict[int, tuple]:
    """One frozen forward that keeps, per layer, what the decode gate trains on.

    Unlike the prefill targets, the decode target is per query row ((S, nb) per kv head, 16 times
    the prefill map at 8k tokens), so it is computed in the training loop rather than cached, and
    only for the sampled query `rows`.

    Args:
        model: a transformers model of a family `seerlib.families` knows.
        input_ids: (B, S) token ids, no padding.
        block_size: b.
        rows: (R,) long, the query positions to keep, ascending.
        target: "exact" (the model's attention plus `reference.decode_block_truth` in fp32) or
            "kernel" (the attention *is* `ops.decode_pooled_attention`, which emits the target in
            the same pass: bf16 inputs on CUDA).
        scale: score scale when the model passes none (1 / sqrt(d)).
        pooling: the target's pooling (`reference.decode_block_truth`): "max" (SeerAttention-R's)
            or "mass" (each block's share of the group's attention; target "exact" only).
    Returns:
        {layer: (q_pre (B, Hq, R, d), k_pooled {op: (B, Hkv, nb, d)} for op in avg/max/min, both
        float32, truth (B, Hkv, R, nb) float32 row-normalized)}.
    """
    decode_target_source(pooling, target, input_ids.device)
    pre: dict = {}
    out: dict[int, tuple] = {}

    def attend(module, query, key, value, attention_mask, *, default, **kwargs):
        i = module.layer_idx
        p = pre.pop(i)
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"layer {i}: {query.shape[2]} queries against {key.shape[2]} keys; "
                             "distillation expects one full causal pass (no KV cache)")
        s = kwargs.get("scaling") or scale
        cap = kwargs.get("softcap")  # the model's logit soft-cap (Gemma2), None elsewhere
        pooled = {op: pool_blocks(p["k_pre"], block_size, (op,)) for op in POOL_OPS}
        q_rows = p["q_pre"][:, :, rows].float()
        if target == "exact":
            truth = decode_block_truth(query[:, :, rows], key, block_size, s, positions=rows,
                                       softcap=cap, pooling=pooling)
            out[i] = (q_rows, pooled, truth)
            return default(module, query, key, value, attention_mask, **kwargs)
        kd = target_dtype(target, query.device, query.dtype)
        o, truth = ops.decode_pooled_attention(query.to(kd), key.to(kd), value.to(kd), block_size,
                                               scale=s, softcap=cap)
        out[i] = (q_rows, pooled, truth[:, :, rows].float())
        return o.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, S, Hq, d)

    with pre_rope_hooks(model, pre), attention_override(model, attend):
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    return out
