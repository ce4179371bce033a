"""FlexAttention as the block-sparse path: a selection -> a `BlockMask`, and the compiled call.

`to_flex_block_mask(mask, S, b)` lists the kept tiles (below the diagonal as full blocks, the
diagonal ones as partial blocks with the causal `mask_mod`); `flex_sparse_attention` runs
`flex_attention` on them, compiled once per process (on a CPU this is the fast sparse path: it
skips dropped tiles, where the reference computes every score). A logit soft-cap (Gemma2) is a
`score_mod`, one per cap value, so the compiled kernel is reused.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from seerlib.reference import check_block_size, check_softcap, mask_to_index, num_blocks

__all__ = ["flex_sparse_attention", "to_flex_block_mask"]


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def to_flex_block_mask(block_mask: torch.Tensor, seq_len: int, block_size: int = 64,
                       mask_mod_from_blocks: bool = False):
    """A FlexAttention `BlockMask` computing exactly the kept tiles of a selection, causally.

    Kept tiles strictly below the diagonal are passed as full blocks (no per-score mask), the
    diagonal tiles as partial blocks with the causal `mask_mod`. Compiled `flex_attention` visits
    only the listed blocks; uncompiled (eager) `flex_attention` ignores the block lists and applies
    `mask_mod` to every score, so for eager use pass `mask_mod_from_blocks=True`, which also encodes
    the selection in `mask_mod` (a new function per call: under torch.compile it would recompile).

    Args:
        block_mask: (B, H, nb, nb) bool, nb = ceil(seq_len / block_size); tiles above the block
            diagonal are ignored.
        seq_len: S, query and key length.
        block_size: tile size b.
        mask_mod_from_blocks: make `mask_mod` causal AND in a kept tile (eager flex_attention).
    Returns:
        torch.nn.attention.flex_attention.BlockMask with BLOCK_SIZE (b, b) and seq_lengths (S, S);
        its `to_dense()` (cropped to nb x nb) equals the causal part of `block_mask`.
    """
    b = check_block_size(block_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens; got {seq_len!r}")
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        got = block_mask.dtype if torch.is_tensor(block_mask) else type(block_mask).__name__
        raise ValueError(f"block_mask must be a torch.bool tensor (B, H, nb, nb); got {got}")
    nb = num_blocks(seq_len, b)
    if block_mask.dim() != 4 or tuple(block_mask.shape[-2:]) != (nb, nb):
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}; seq_len {seq_len} at block size {b} "
            f"needs (B, H, {nb}, {nb})"
        )
    eye = torch.eye(nb, dtype=torch.bool, device=block_mask.device)
    below = torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril(-1)
    partial_counts, partial_idx = mask_to_index(block_mask & eye)
    full_counts, full_idx = mask_to_index(block_mask & below)
    mask_mod = _causal_mask_mod
    if mask_mod_from_blocks:
        kept = block_mask.tril()

        def mask_mod(b_, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & kept[b_, h, q_idx // b, kv_idx // b]

    # entries past each row's count are -1 in mask_to_index; flex reads only the first `count`
    # entries in its kernels but its dense conversion indexes them all, so keep them in range
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_idx.clamp_min(0),
        full_counts,
        full_idx.clamp_min(0),
        BLOCK_SIZE=b,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


_COMPILED_FLEX = None


@functools.cache
def _softcap_mod(cap: float):
    """score_mod for logit soft-capping: FlexAttention's scaled score x -> cap * tanh(x / cap)."""

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


def _flex(compiled: bool):
    global _COMPILED_FLEX
    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_sparse_attention(q, k, v, block_mask: torch.Tensor, block_size: int,
                          scale: float | None = None, compiled: bool = True,
                          softcap: float | None = None) -> torch.Tensor:
    """Block-sparse attention of the kept tiles through FlexAttention.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d) (GQA when Hq > Hkv).
        block_mask: (B, Hq, nb, nb) bool selection.
        block_size: tile size b.
        scale: score scale (FlexAttention's default 1 / sqrt(d) when None).
        compiled: use the compiled kernel (it visits only the kept tiles); eager flex computes
            every score, so the selection is also encoded in its `mask_mod`.
        softcap: logit soft-cap c (scaled scores x -> c * tanh(x / c)), or None.
    Returns:
        (B, Hq, S, d).
    """
    bm = to_flex_block_mask(block_mask, q.shape[2], block_size, mask_mod_from_blocks=not compiled)
    softcap = check_softcap(softcap)
    kw = {} if softcap is None else {"score_mod": _softcap_mod(softcap)}
    if q.is_cuda and block_size < 128:
        # the CUDA kernel's default tiles (128) must divide the mask's block size
        kw["kernel_options"] = {"BLOCK_M": block_size, "BLOCK_N": block_size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _flex(compiled)(q, k, v, block_mask=bm, scale=scale,
                               enable_gqa=q.shape[1] != k.shape[1], **kw)
