"""The one dispatch point for attention: Triton kernels on CUDA, the exact reference elsewhere.

Everything else in seerlib calls these functions (attention, the block-sparse and pooled
attention, the decode steps and their selection, the gate's block pooling and the kernel's block
index) and never picks an implementation by hand.

Backends:
    "auto" (default): the Triton kernels for CUDA tensors in bfloat16/float16 whose head dim and
        block size are among 16, 32, 64, 128; the reference for everything else. A CUDA call that
        only its head dim keeps off the kernels (Gemma 3's 256) warns once per head dim
        (`KernelFallbackWarning`): the reference runs, and it is slow on a GPU.
    "triton": always the kernels (CPU tensors need TRITON_INTERPRET=1 set before triton loads);
        a head dim the kernels lack is refused, naming it and theirs.
    "reference": always `seerlib.reference`.
The ops take `softcap=` (Gemma2's attention logit soft-cap: logits -> c * tanh(logits / c)
before the mask and softmax), and so do all the kernels, the decode step's and the decode
target's too.
Choose per call (`backend=`), for a block of code (`with use_backend("reference"): ...`), or for
the process (environment variable SEERLIB_BACKEND). Precedence: argument, context, environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import types
import warnings

import torch

from . import gate, reference
from .select import (
    Selection,
    density_to_k,
    kernel_forced_args,
    row_topk_kernel_args,
    select_blocks,
)

__all__ = [
    "attention",
    "pooled_attention",
    "block_sparse_attention",
    "decode_attention",
    "decode_pooled_attention",
    "sparse_decode_attention",
    "decode_select",
    "decode_gate_select",
    "pool_blocks",
    "gate_logits",
    "kernel_path",
    "block_index",
    "select_index",
    "select_index_fused",
    "use_backend",
    "get_backend",
    "BACKENDS",
    "KERNEL_HEAD_DIMS",
    "KernelFallbackWarning",
]

BACKENDS = ("auto", "triton", "reference")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "seerlib_backend", default=None
)


def _check_backend(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def get_backend(backend: str | None = None) -> str:
    """The backend in force: the argument, else the innermost `use_backend`, else SEERLIB_BACKEND,
    else "auto"."""
    if backend is not None:
        return _check_backend(backend)
    ctx = _backend.get()
    if ctx is not None:
        return ctx
    return _check_backend(os.environ.get("SEERLIB_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: run the attention ops inside it through `backend`."""
    token = _backend.set(_check_backend(backend))
    try:
        yield
    finally:
        _backend.reset(token)


# Shapes the kernels are built for; "auto" sends anything else to the reference.
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)


class KernelFallbackWarning(UserWarning):
    """A CUDA call that "auto" sends to the (slow) reference because the kernels lack its shape."""


_warned_head_dims: set[int] = set()  # head dims warned about already (once per process each)


def _kernel_device(q) -> bool:
    """Whether q is where "auto" runs the kernels: a 4-D CUDA tensor in bfloat16/float16."""
    return (isinstance(q, torch.Tensor) and q.is_cuda and q.dim() == 4
            and q.dtype in (torch.bfloat16, torch.float16))


def _head_dim_fallback(d: int) -> None:
    if d in _warned_head_dims:
        return
    _warned_head_dims.add(d)
    warnings.warn(
        f"head dim {d} is not among the Triton kernels' head dims {KERNEL_HEAD_DIMS}: seerlib.ops "
        f"runs the exact PyTorch reference for it, which is slow on a GPU (materialized scores, "
        f"every tile computed); shown once per head dim", KernelFallbackWarning, stacklevel=4)


def _wants_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _use_kernels(q: torch.Tensor, backend: str | None, block_size: int | None = None,
                 inputs=(), differentiable: bool = False) -> bool:
    """Whether the Triton kernels take this call. Only block-sparse attention has a kernel
    backward (`differentiable`); for the others, when autograd needs one (grad mode on and an
    input that requires grad), "auto" takes the differentiable reference and "triton" refuses, so
    gradients are never silently lost. A head dim outside KERNEL_HEAD_DIMS: "triton" refuses;
    "auto" takes the reference, warning once on CUDA."""
    name = get_backend(backend)
    if name == "reference":
        return False
    d = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    if name == "triton" and d not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"backend='triton': head dim {d} is not among the Triton kernels' head dims "
            f"{KERNEL_HEAD_DIMS}; use backend='auto' or 'reference' (the exact reference, slow on "
            "a GPU)")
    if not differentiable and _wants_grad(inputs):
        if name == "triton":
            raise RuntimeError(
                "this Triton kernel has no backward yet (only block_sparse_attention's has), and "
                "an input requires grad: use backend='reference' (or 'auto', which takes it), or "
                "run under torch.no_grad()")
        return False
    if name == "triton":
        return True
    if not _kernel_device(q) or (block_size is not None and block_size not in KERNEL_BLOCK_SIZES):
        return False
    if d not in KERNEL_HEAD_DIMS:
        _head_dim_fallback(d)
        return False
    return True


def _kernels():
    """The kernel module, imported on first use (triton stays unloaded on CPU paths).

    Submodules are imported by name: under an editable install run from outside the repo,
    setuptools can resolve `seerlib.kernels` as a namespace package whose __init__ never ran.
    """
    # Lazy on purpose: importing the kernels imports triton, which `import seerlib` must not.
    from seerlib.kernels.block_sparse_attention import block_sparse_attention
    from seerlib.kernels.block_sparse_backward import block_sparse_attention_trainable  # lazy
    from seerlib.kernels.decode_truth import decode_pooled_attention
    from seerlib.kernels.pooled_attention import attention, pooled_attention
    from seerlib.kernels.sparse_decode import (  # lazy, as the three above
        decode_attention,
        sparse_decode_attention,
    )

    return types.SimpleNamespace(
        attention=attention,
        pooled_attention=pooled_attention,
        block_sparse_attention=block_sparse_attention,
        block_sparse_attention_trainable=block_sparse_attention_trainable,
        decode_pooled_attention=decode_pooled_attention,
        sparse_decode_attention=sparse_decode_attention,
        decode_attention=decode_attention,
    )


def attention(
    q, k, v, causal: bool = True, scale: float | None = None, *, softcap: float | None = None,
    backend: str | None = None,
):
    """Exact softmax attention. q (B, Hq, S, d), k, v (B, Hkv, S, d) -> (B, Hq, S, d); softcap,
    the logit soft-cap c (logits -> c * tanh(logits / c)) or None."""
    if _use_kernels(q, backend, inputs=(q, k, v)):
        return _kernels().attention(q, k, v, causal=causal, scale=scale, softcap=softcap)
    return reference.attention(q, k, v, causal=causal, scale=scale, softcap=softcap)


def pooled_attention(
    q,
    k,
    v,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    backend: str | None = None,
):
    """Attention plus its block max-pooled map.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d); block_size: tile size b.
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None.
    Returns:
        out (B, Hq, S, d) in q's dtype, pooled (B, Hq, nb, nb) float32 (largest softmax
        probability of each tile, 0 above the diagonal when causal).
    """
    if _use_kernels(q, backend, block_size, inputs=(q, k, v)):
        return _kernels().pooled_attention(q, k, v, block_size, causal=causal, scale=scale,
                                           softcap=softcap)
    return reference.pooled_attention(q, k, v, block_size, causal=causal, scale=scale,
                                      softcap=softcap)


def block_sparse_attention(
    q,
    k,
    v,
    block_mask_or_index,
    block_size: int,
    scale: float | None = None,
    *,
    backend: str | None = None,
    sync_free: bool = False,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
):
    """Causal attention over kept (query block, key block) tiles.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d).
        block_mask_or_index: bool mask (B, Hq, nb, nb), or `mask_to_index`'s (counts, indices), or
            (kernel path) a `seerlib.kernels.BlockIndex` built once and reused.
        block_size: tile size b.
        sync_free: (kernel path) build the block index without reading the device from the host,
            so the call never waits for the GPU (`seerlib.kernels.build_block_index`).
        out: (kernel path) a (B, Hq, S, d) buffer to write into (a CUDA graph's static output).
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None; the backward too.
    Returns:
        out (B, Hq, S, d); a row with nothing kept is zeros. Differentiable in q, k, v on every
        backend: the kernel path has its own backward over the kept tiles
        (`seerlib.kernels.block_sparse_backward`).
    """
    if _use_kernels(q, backend, block_size, inputs=(q, k, v), differentiable=True):
        if _wants_grad((q, k, v)):
            if out is not None:
                raise ValueError("out= cannot be used when autograd needs the backward")
            return _kernels().block_sparse_attention_trainable(
                q, k, v, block_mask_or_index, block_size, scale=scale, sync_free=sync_free,
                softcap=softcap)
        return _kernels().block_sparse_attention(
            q, k, v, block_mask_or_index, block_size, scale=scale, sync_free=sync_free, out=out,
            softcap=softcap)
    mask = block_mask_or_index
    if isinstance(mask, (tuple, list)) and len(mask) == 2:
        counts, indices = mask
        mask = reference.index_to_mask(
            counts, indices, reference.num_blocks(q.shape[2], block_size)
        )
    elif not isinstance(mask, torch.Tensor):
        raise ValueError(
            "the reference backend takes a bool block mask or (counts, indices); got "
            f"{type(mask).__name__}"
        )
    return reference.block_sparse_attention(q, k, v, mask, block_size, scale=scale,
                                            softcap=softcap)


def kernel_path(q, block_size: int, backend: str | None = None) -> bool:
    """Whether `block_sparse_attention(q, ...)` at this block size runs the Triton kernel (and so
    takes a `block_index`) rather than the reference; reads only q's shape, dtype and device."""
    return _use_kernels(q, backend, block_size)


def block_index(mask: torch.Tensor, seq_len: int, block_size: int):
    """The kernel's block index of a (B, Hq, nb, nb) bool mask, built on the device without a
    host sync (`seerlib.kernels.build_block_index(..., sync_free=True)`, one query block per
    tile), for `block_sparse_attention` on the kernel path (`kernel_path`): build it once and
    reuse it, or inside a CUDA graph."""
    from seerlib.kernels.block_index import build_block_index  # lazy: imports triton

    B, Hq = mask.shape[:2]
    return build_block_index(mask, B, Hq, seq_len, block_size, rows_per_tile=1, sync_free=True)


def select_index_fused(selection: Selection) -> bool:
    """Whether `select_index` takes `selection` in one kernel launch (on the kernel path)."""
    return row_topk_kernel_args(selection) is not None


def select_index(logits: torch.Tensor, selection: Selection, seq_len: int, block_size: int, *,
                 backend: str | None = None):
    """The kernel's block index of `select_blocks(logits, selection)`, as `block_index` builds
    it (one query block per tile, sync-free): in one launch on the kernel path for top-k per row
    (`seerlib.kernels.prefill_select`), else those two.

    Args:
        logits: (B, H, nb, nb) float block scores (gate logits); entries above the block
            diagonal are ignored.
        selection: a prefill Selection; seq_len: S; block_size: b.
    Returns:
        a `seerlib.kernels.BlockIndex` for `block_sparse_attention` on the kernel path.
    """
    name = get_backend(backend)
    kw = row_topk_kernel_args(selection)
    if kw is not None and (name == "triton" or (name == "auto" and logits.is_cuda)):
        from seerlib.kernels.prefill_select import prefill_select  # lazy: imports triton

        nb = logits.shape[-1]
        return prefill_select(logits, seq_len, block_size, density_to_k(selection.density, nb),
                              **kw)
    return block_index(select_blocks(logits, selection), seq_len, block_size)


def pool_blocks(x, block_size: int, pool_ops, *, out: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """The gate's block pooling (`seerlib.gate.pool_blocks`: mean / max / min over each block of
    tokens, the ops concatenated on channels), in one pass over x on the kernel path.

    Args:
        x: (B, H, S, d), e.g. a layer's pre-RoPE q or k; pool_ops: distinct ops from
            ("avg", "max", "min"), in output order; block_size: b.
        out: optional (B, H, nb, len(pool_ops) * d) buffer that receives the result on every
            backend (a CUDA graph's static input); float32 when None.
    Returns:
        (B, H, nb, len(pool_ops) * d): `out`, or a new float32 tensor.
    """
    if _use_kernels(x, backend, block_size, inputs=(x,)):
        from seerlib.kernels.block_pool import pool_blocks as kernel_pool  # lazy: imports triton

        return kernel_pool(x, block_size, pool_ops, out=out)
    pooled = gate.pool_blocks(x, block_size, pool_ops)
    if out is None:
        return pooled
    if tuple(out.shape) != tuple(pooled.shape) or out.device != pooled.device:
        raise ValueError(f"out must be {tuple(pooled.shape)} on {pooled.device}; got "
                         f"{tuple(out.shape)} on {out.device}")
    return out.copy_(pooled)


def gate_logits(gate, q_pooled: torch.Tensor, k_pooled: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """A prefill gate's block logits for selection (no autograd): `AttnGate.block_scores`, in one
    launch on the kernel path where the gate's rotary and d_gate allow it
    (`seerlib.kernels.gate_logits.supported`), else the gate's own torch ops.

    Args:
        gate: a `seerlib.gate.AttnGate`.
        q_pooled: (B, Hq, nb, len(q_pool) * d); k_pooled: (B, Hkv, nb, len(k_pool) * d).
    Returns:
        (B, Hq, nb, nb) logits on and below the block diagonal (float32 from the kernel, the
        gate's dtype from torch); the entries above it unspecified.
    """
    name = get_backend(backend)
    with torch.no_grad():
        if name == "triton" or (name == "auto" and q_pooled.is_cuda):
            from seerlib.kernels import gate_logits as fused  # lazy: imports triton

            if fused.supported(gate):
                return fused.gate_logits(gate, q_pooled, k_pooled)
        return gate.block_scores(q_pooled, k_pooled)


# ---------------------------------------------------------------- decode (SeerAttention-R)


def decode_pooled_attention(q, k, v, block_size: int, scale: float | None = None, *,
                            softcap: float | None = None, backend: str | None = None):
    """Causal attention plus the decode gate's target in one pass.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d); block_size: b.
        softcap: logit soft-cap c, or None (the kernel takes it too).
    Returns:
        out (B, Hq, S, d) in q's dtype; truth (B, Hkv, S, nb) float32, each row's attention
        max-pooled over each key block and over the group's heads, normalized
        (`reference.decode_block_truth`).
    """
    if _use_kernels(q, backend, block_size, inputs=(q, k, v)):
        return _kernels().decode_pooled_attention(q, k, v, block_size, scale=scale,
                                                  softcap=softcap)
    return (reference.attention(q, k, v, causal=True, scale=scale, softcap=softcap),
            reference.decode_block_truth(q, k, block_size, scale, softcap=softcap).float())


def sparse_decode_attention(q, k, v, block_index, block_count, block_size: int, *,
                            kv_lens=None, scale: float | None = None,
                            softcap: float | None = None, backend: str | None = None):
    """One decode query per row over the kept key blocks of its kv head (shapes:
    `reference.sparse_decode_attention`; softcap, the logit soft-cap c or None): the Triton
    split-KV kernel on CUDA bf16/fp16 (`seerlib.kernels.sparse_decode`), else the reference. The
    kernel takes block_index and block_count as int32 (`seerlib.decode.select.decode_index` makes
    them so); other dtypes are converted. It never syncs the host, so it skips what the reference
    refuses (negative counted entries) instead of raising."""
    if _use_kernels(q, backend, block_size, inputs=(q, k, v)):
        return _kernels().sparse_decode_attention(
            q, k, v, block_index.to(torch.int32), block_count.to(torch.int32), block_size,
            kv_lens=kv_lens, scale=scale, softcap=softcap)
    return reference.sparse_decode_attention(q, k, v, block_index, block_count, block_size,
                                             kv_lens=kv_lens, scale=scale, softcap=softcap)


def decode_attention(q, k, v, *, kv_lens=None, scale: float | None = None,
                     softcap: float | None = None, backend: str | None = None):
    """Dense attention of one decode query per row over its KV cache (softcap, the logit
    soft-cap c or None): the same kernel over every key block on CUDA bf16/fp16, else the
    reference."""
    if _use_kernels(q, backend, inputs=(q, k, v)):
        return _kernels().decode_attention(q, k, v, kv_lens=kv_lens, scale=scale, softcap=softcap)
    return reference.decode_attention(q, k, v, kv_lens=kv_lens, scale=scale, softcap=softcap)


def _select_kernel_args(selection, on_cuda: bool, block_size: int, backend) -> dict | None:
    """The decode selection kernels' budget and forced-block arguments for `selection`, or None
    when the torch path takes it (the backend, a CPU tensor, no budget, or a forced rule without
    a kernel form: `seerlib.select.DECODE_KERNEL_FORCED`)."""
    from seerlib.decode.select import blocks_per_query  # lazy, as in decode_select

    name = get_backend(backend)
    if not (name == "triton" or (name == "auto" and on_cuda)) or not selection.has_budget:
        return None
    forced = kernel_forced_args(selection)
    if forced is None:
        return None  # a rule the kernels do not compute: the torch path
    mode = ("tokens" if selection.tokens is not None else
            "density" if selection.density is not None else "threshold")
    return dict(mode=mode, budget_blocks=blocks_per_query(selection, block_size) or 0,
                density=selection.density or 0.0, threshold=selection.threshold or 0.0,
                **forced)


def decode_select(scores: torch.Tensor, selection, position: torch.Tensor, num_blocks: int,
                  block_size: int, max_blocks: int | None = None, *,
                  backend: str | None = None):
    """One decode step's selection as the sparse decode kernel's index:
    `seerlib.decode.select.decode_index(select_decode(...), max_blocks)` for one query per row,
    in one launch on the kernel path (`seerlib.kernels.decode_select`), else those two.

    Args:
        scores: (B, Hkv, 1, W) or (B, Hkv, W) block scores, W <= num_blocks (the blocks past W
            are no candidates, e.g. the newest, partial block the K-compression cache lacks).
        selection: a decode `Selection` (`seerlib.decode.select.check_decode_selection`).
        position: (1,) integer tensor on the scores' device: the query's position t, the same
            for every row; read on the device, so no host sync and one CUDA graph for every step.
        num_blocks: nb, the key blocks of the KV cache; block_size: b.
        max_blocks: K, the index width (`most_blocks(selection, b)`; default nb).
    Returns:
        (block_index (B, Hkv, K) int32, ascending then -1; block_count (B, Hkv) int32).
    """
    # Lazy: seerlib.decode imports seerlib.integrate, which imports this module.
    from seerlib.decode.select import check_decode_selection, decode_index, select_decode

    check_decode_selection(selection)
    if scores.dim() == 3:
        scores = scores[:, :, None]
    if scores.dim() != 4 or scores.shape[2] != 1:
        raise ValueError(f"scores must be (B, Hkv, 1, W) for one decode step; got "
                         f"{tuple(scores.shape)}")
    kw = _select_kernel_args(selection, scores.is_cuda, block_size, backend)
    if kw is not None:
        from seerlib.kernels.decode_select import decode_select as kernel_select  # lazy: triton

        return kernel_select(scores, position, num_blocks, block_size, max_blocks=max_blocks,
                             **kw)
    nb, W = int(num_blocks), scores.shape[-1]
    if W < nb:  # the blocks past the scores: no candidates
        scores = torch.nn.functional.pad(scores.float(), (0, nb - W), value=float("-inf"))
    keep = select_decode(scores, selection, position, block_size)
    return decode_index(keep, max_blocks)


def decode_gate_select(gate, q_pre: torch.Tensor, k_gate: torch.Tensor, selection,
                       position: torch.Tensor, num_blocks: int, max_blocks: int | None = None, *,
                       backend: str | None = None):
    """The decode gate's whole step for one query per row: its query, its logits over the
    K-compression cache, the selection and the kernel's index; one launch on the kernel path
    (`seerlib.kernels.decode_gate_select`, where `fusable(gate)`), else the gate's query and a
    matmul, then `decode_select`.

    Args:
        gate: the layer's `DecodeGate`; q_pre: (B, Hq, 1, d) pre-RoPE queries;
        k_gate: (B, Hkv, n, d_gate) the cache's gate keys of the n full blocks;
        selection, position, num_blocks, max_blocks: as `decode_select`.
    Returns:
        (block_index (B, Hkv, K) int32, block_count (B, Hkv) int32).
    """
    # Lazy: seerlib.decode imports seerlib.integrate, which imports this module.
    from seerlib.decode.select import check_decode_selection

    check_decode_selection(selection)
    b = gate.block_size
    kw = _select_kernel_args(selection, q_pre.is_cuda, b, backend)
    if kw is not None:
        from seerlib.kernels import decode_gate_select as fused  # lazy: imports triton

        if fused.fusable(gate) and gate.d_gate in KERNEL_HEAD_DIMS:
            return fused.decode_gate_select(gate, q_pre, k_gate, position, num_blocks,
                                            max_blocks=max_blocks, **kw)[:2]
    with torch.no_grad():
        logits = torch.matmul(gate.query(q_pre, position), k_gate.transpose(-1, -2))
    return decode_select(logits, selection, position, num_blocks, b, max_blocks,
                         backend=backend)
