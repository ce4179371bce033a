"""Exact pure-PyTorch attention: the oracle every fast path in seerlib is tested against.

Shapes (everywhere in seerlib):
    q: (B, Hq, S, d); k, v: (B, Hkv, S, d) with Hq a multiple of Hkv (GQA: query head h reads
    kv head h // (Hq // Hkv)). Block maps and masks: (B, Hq, nb, nb) with nb = ceil(S / block_size);
    the last block may be partial.

Everything is computed in float32 (float64 inputs stay float64) in chunks of query rows, so that
S = 8192 with 9 heads fits in a few GB on a CPU. This module imports nothing else of ours.

It is also the one home of the small primitives the rest of seerlib shares: `default_scale`,
`check_softcap`, `grouped_scores` (GQA scores without repeating k), `causal_block_count` and
`causal_block_mask`.

Soft-capping (Gemma2's `attn_logit_softcapping`): with `softcap` c, the scaled logits
x = scale * q.k become c * tanh(x / c) before the causal or block mask and the softmax, as in
transformers' eager Gemma2 attention. softcap=None computes exactly what it did without it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention", "pooled_attention", "block_sparse_attention", "mask_to_index", "index_to_mask",
    "num_blocks", "check_qkv", "check_block_mask", "check_block_size", "check_softcap",
    "default_scale", "grouped_scores", "causal_block_count", "causal_block_mask",
]

# Query rows per chunk are sized so one chunk's score matrix holds about this many elements.
_CHUNK_ELEMENTS = 1 << 25


def num_blocks(seq_len: int, block_size: int) -> int:
    """ceil(seq_len / block_size): the number of blocks, the last one possibly partial."""
    return -(-seq_len // block_size)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    return block_size


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate q (B, Hq, S, d), k and v (B, Hkv, S, d); return (B, Hq, Hkv, S, d)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, S, d); got {t.dim()}-D with shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")
    B, Hq, S, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Bk, Hkv, Sk, dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch size {Bk}; q has {B}")
    if Sk != S:
        raise ValueError(
            f"k has sequence length {Sk}; q has {S} (prefill attention needs equal lengths)"
        )
    if dk != d:
        raise ValueError(f"k has head dim {dk}; q has {d}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k has {Hkv} heads; q's {Hq} heads need a divisor of {Hq}")
    if S == 0:
        raise ValueError("sequence length is 0; need at least one token")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    return B, Hq, Hkv, S, d


def check_block_mask(block_mask: torch.Tensor, B: int, Hq: int, nb: int) -> None:
    """Validate a boolean block mask of shape (B, Hq, nb, nb)."""
    if not isinstance(block_mask, torch.Tensor):
        raise ValueError(f"block_mask must be a torch.Tensor; got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be torch.bool; got {block_mask.dtype}")
    if tuple(block_mask.shape) != (B, Hq, nb, nb):
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}; expected (B, Hq, nb, nb) = "
            f"{(B, Hq, nb, nb)}"
        )


# ---------------------------------------------------------------- shared primitives


def default_scale(d: int, scale: float | None = None) -> float:
    """The attention score scale: `scale` as a float, or 1 / sqrt(d) when it is None.

    Args:
        d: head dim.
        scale: an explicit scale, or None.
    Returns:
        float.
    """
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def check_softcap(softcap) -> float | None:
    """None, or the attention logit soft-cap c (logits -> c * tanh(logits / c)) as a float > 0."""
    if softcap is None:
        return None
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a positive finite number; got {softcap!r}")
    return float(softcap)


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """GQA attention scores q @ k^T * scale without repeating k's heads.

    Query head h reads kv head h // (Hq // Hkv): q is viewed as (B, Hkv, Hq // Hkv, R, d) and
    multiplied against k broadcast over the group. Computed in the inputs' dtype (cast first).

    Args:
        q: (B, Hq, R, d) queries (R rows: all of S, or a chunk of it).
        k: (B, Hkv, S, d) keys, Hkv a divisor of Hq.
        scale: multiplies the product; 1 / sqrt(d) when None. 1.0 skips the multiply (for callers
            that scaled q already).
    Returns:
        scores: (B, Hq, R, S).
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q must be (B, Hq, R, d) and k (B, Hkv, S, d) with Hkv dividing Hq; got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, Hq, R, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = default_scale(d, scale)
    qg = q.reshape(B, Hkv, Hq // Hkv, R, d)  # (B, Hq, R, d) -> (B, Hkv, G, R, d)
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2))  # (B, Hkv, G, R, S)
    if scale != 1.0:
        s = s * scale
    return s.reshape(B, Hq, R, S)


def causal_block_count(nb: int) -> int:
    """Tiles on or below the diagonal of an nb x nb block map: nb * (nb + 1) / 2."""
    return nb * (nb + 1) // 2


def causal_block_mask(nb: int, device=None) -> torch.Tensor:
    """(nb, nb) bool, True on and below the block diagonal (the tiles causal attention can use)."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(B: int, Hq: int, S: int, multiple: int) -> int:
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * S))
    rows = max(multiple, rows // multiple * multiple)
    return min(rows, S + (-S) % multiple)


def _scores(q, k, r0, r1, scale, softcap=None):
    """Scaled (and soft-capped) scores of query rows [r0, r1) against all keys: (B, Hq, R, S)."""
    dt = _compute_dtype(q)
    s = grouped_scores(q[:, :, r0:r1].to(dt), k.to(dt), scale)
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def _apply_v(p, v, group):
    """p (B, Hq, R, S) @ v (B, Hkv, S, d) -> (B, Hq, R, d) without repeating v."""
    B, Hq, R, S = p.shape
    Hkv, d = v.shape[1], v.shape[3]
    out = torch.matmul(p.reshape(B, Hkv, group, R, S), v.to(p.dtype).unsqueeze(2))
    return out.reshape(B, Hq, R, d)


def _causal(r0: int, r1: int, S: int, device) -> torch.Tensor:
    rows = torch.arange(r0, r1, device=device).unsqueeze(1)
    return torch.arange(S, device=device).unsqueeze(0) <= rows  # (R, S)


def _safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where rows of all -inf give zeros, never NaN."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d), Hq a multiple of Hkv.
        causal: mask keys after each query.
        scale: score scale; 1 / sqrt(d) by default.
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None.
    Returns:
        out: (B, Hq, S, d) in q's dtype.
    """
    return pooled_attention(q, k, v, None, causal=causal, scale=scale, softcap=softcap)[0]


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int | None,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention plus its block max-pooled attention map (the distillation target).

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d).
        block_size: tile size b of the pooled map (None: skip the map).
        causal: causal attention; tiles above the block diagonal are then 0.
        scale: score scale; 1 / sqrt(d) by default.
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None.
    Returns:
        out: (B, Hq, S, d) in q's dtype.
        pooled: (B, Hq, nb, nb) float32, nb = ceil(S / b): pooled[b, h, i, j] is the largest softmax
            probability inside tile (i, j) of the attention map (not row-normalized).
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, v)
    if block_size is not None:
        check_block_size(block_size)
    group, softcap = Hq // Hkv, check_softcap(softcap)
    scale = default_scale(d, scale)
    b = block_size or 1
    nb = num_blocks(S, b)
    out = torch.empty_like(q)
    pooled = (
        torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
        if block_size is not None
        else None
    )
    rows = _chunk_rows(B, Hq, S, b)
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        s = _scores(q, k, r0, r1, scale, softcap)
        if causal:
            s = s.masked_fill(~_causal(r0, r1, S, q.device), float("-inf"))
        p = _safe_softmax(s)  # (B, Hq, R, S)
        out[:, :, r0:r1] = _apply_v(p, v, group).to(q.dtype)
        if pooled is not None:
            pad_k, pad_q = nb * b - S, (-(r1 - r0)) % b
            tiles = torch.nn.functional.pad(p, (0, pad_k, 0, pad_q))  # zeros never win a max
            R = tiles.shape[2]
            # (B, Hq, R, nb*b) -> (B, Hq, R/b, b, nb, b) -> max over both b
            tiles = tiles.reshape(B, Hq, R // b, b, nb, b).amax(dim=(3, 5))
            pooled[:, :, r0 // b : r0 // b + R // b] = tiles.float()
    return out, pooled


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention restricted to the kept (query block, key block) tiles.

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d).
        block_mask: (B, Hq, nb, nb) bool, True = tile computed. Causality still holds inside kept
            tiles; kept tiles above the diagonal contribute nothing.
        block_size: tile size b.
        scale: score scale; 1 / sqrt(d) by default.
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None.
    Returns:
        out: (B, Hq, S, d) in q's dtype; a query row whose kept keys are all masked gives zeros.
        Only kept tiles on or below the diagonal are computed, as in the kernel: a NaN or inf in
        a tile that a row does not compute never reaches that row.
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, v)
    b = check_block_size(block_size)
    nb = num_blocks(S, b)
    check_block_mask(block_mask, B, Hq, nb)
    group, softcap = Hq // Hkv, check_softcap(softcap)
    scale = default_scale(d, scale)
    out = torch.empty_like(q)
    key_block = torch.arange(S, device=q.device) // b  # (S,)
    # Scores of dropped tiles are replaced (masked_fill), never used. V is multiplied by the
    # probabilities, and 0 * NaN is NaN: with a non-finite V, each key block's product is kept
    # only for the rows that compute that tile (torch.where), one key block at a time.
    finite_v = bool(torch.isfinite(v).all())
    rows = _chunk_rows(B, Hq, S, 1)
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        s = _scores(q, k, r0, r1, scale, softcap)
        qb = torch.arange(r0, r1, device=q.device) // b
        keep = block_mask[:, :, qb][..., key_block]  # (B, Hq, R, S)
        keep = keep & _causal(r0, r1, S, q.device)
        p = _safe_softmax(s.masked_fill(~keep, float("-inf")))
        if finite_v:  # dropped probabilities are exact zeros: one product is the kept tiles' sum
            o = _apply_v(p, v, group)
        else:
            o = _apply_v_kept_tiles(p, v, group, block_mask[:, :, qb], qb, b)
        out[:, :, r0:r1] = o.to(q.dtype)
    return out


def _apply_v_kept_tiles(p, v, group, row_mask, qb, b):
    """p @ v summed over the key blocks each row computes: kept, on or below its diagonal.

    p: (B, Hq, R, S); v: (B, Hkv, S, d); row_mask: (B, Hq, R, nb), the block mask of each row's
    query block; qb: (R,) those query blocks. Returns (B, Hq, R, d).
    """
    B, Hq, R, S = p.shape
    out = torch.zeros(B, Hq, R, v.shape[-1], dtype=p.dtype, device=p.device)
    for j in range(row_mask.shape[-1]):
        computed = row_mask[..., j] & (qb >= j)  # (B, Hq, R)
        if not bool(computed.any()):
            continue
        part = _apply_v(p[..., j * b : (j + 1) * b], v[:, :, j * b : (j + 1) * b], group)
        out += torch.where(computed.unsqueeze(-1), part, torch.zeros_like(part))
    return out


def mask_to_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept key blocks of each query block, as the sparse kernel reads them.

    Args:
        block_mask: (B, H, nb, nb) bool.
    Returns:
        counts: (B, H, nb) int32, the number of kept key blocks per query block.
        indices: (B, H, nb, nb) int32, the kept key-block indices in ascending order, then -1.
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        got = (
            block_mask.dtype if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
        )
        raise ValueError(f"block_mask must be a torch.bool tensor; got {got}")
    if block_mask.dim() != 4 or block_mask.shape[-1] != block_mask.shape[-2]:
        raise ValueError(f"block_mask must be (B, H, nb, nb); got shape {tuple(block_mask.shape)}")
    nb = block_mask.shape[-1]
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    cols = torch.arange(nb, device=block_mask.device, dtype=torch.int32)
    # Kept columns sort first (key 0..nb-1), dropped ones after (key nb + j); stable and ascending.
    key = torch.where(block_mask, cols, cols + nb)
    indices = key.sort(dim=-1).values
    indices = torch.where(indices < nb, indices, torch.full_like(indices, -1))
    return counts, indices


def index_to_mask(
    counts: torch.Tensor, indices: torch.Tensor, nb: int | None = None
) -> torch.Tensor:
    """Inverse of `mask_to_index`.

    Args:
        counts: (B, H, nq) int; indices: (B, H, nq, m) int, the first counts entries valid.
        nb: key blocks (default nq).
    Returns:
        (B, H, nq, nb) bool mask.
    """
    if counts.dim() != 3 or indices.dim() != 4 or indices.shape[:3] != counts.shape:
        raise ValueError(
            f"counts must be (B, H, nq) and indices (B, H, nq, m) with matching leading dims; got "
            f"{tuple(counts.shape)} and {tuple(indices.shape)}"
        )
    nb = indices.shape[2] if nb is None else nb
    m = indices.shape[-1]
    valid = torch.arange(m, device=indices.device) < counts.unsqueeze(-1).long()
    if bool(((indices < 0) | (indices >= nb))[valid].any()):
        raise ValueError(
            f"indices hold block numbers outside [0, {nb}) among the first counts entries"
        )
    mask = torch.zeros(*counts.shape, nb + 1, dtype=torch.bool, device=indices.device)
    idx = torch.where(valid, indices.long(), torch.full_like(indices.long(), nb))
    mask.scatter_(-1, idx, True)
    return mask[..., :nb]


# ---------------------------------------------------------------- decode (SeerAttention-R)
#
# Decode shapes: q (B, Hq, 1, d), one new token per sequence; the KV cache k, v (B, Hkv, S, d)
# with S its capacity and kv_lens (B,) the valid length of each row (default S). A decode
# selection is per (batch, kv head): every query head of a group reads the same key blocks.


def check_decode_shapes(q, k, v):
    """Validate one decode query per row, q (B, Hq, 1, d), against k, v (B, Hkv, S, d); return
    (B, Hq, Hkv, S, d). Reads no values (no device sync): the kernels call it too."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D floating-point tensor; got {got}")
    B, Hq, Sq, d = q.shape
    if Sq != 1:
        raise ValueError(f"q must be (B, Hq, 1, d): one decode query per row; got {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k and v must be (B, Hkv, S, d) = ({B}, Hkv, S, {d}); got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k has {Hkv} heads; q's {Hq} heads need a divisor of {Hq}")
    return B, Hq, Hkv, S, d


def _check_decode(q, k, v, kv_lens):
    B, Hq, Hkv, S, d = check_decode_shapes(q, k, v)
    if kv_lens is None:
        kv_lens = torch.full((B,), S, dtype=torch.long, device=q.device)
    if not isinstance(kv_lens, torch.Tensor) or tuple(kv_lens.shape) != (B,):
        got = tuple(kv_lens.shape) if isinstance(kv_lens, torch.Tensor) else kv_lens
        raise ValueError(f"kv_lens must be a (B,) = ({B},) integer tensor; got {got}")
    if bool(((kv_lens < 1) | (kv_lens > S)).any()):
        raise ValueError(f"kv_lens must lie in [1, {S}] (the cache's capacity); got "
                         f"{kv_lens.tolist()}")
    return B, Hq, Hkv, S, d, kv_lens.long()


def _decode_softmax_out(q, k, v, keep, scale, softcap=None):
    """Attention of the one query per row over the keys `keep` (B, Hkv, S) allows: (B, Hq, 1, d)."""
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    s = _scores(q, k, 0, 1, default_scale(d, scale), check_softcap(softcap))  # (B, Hq, 1, S)
    keep = keep.repeat_interleave(Hq // Hkv, dim=1)[:, :, None]  # (B, Hq, 1, S)
    p = _safe_softmax(s.masked_fill(~keep, float("-inf")))
    # a dropped key's V never reaches the output, even when it is NaN (0 * NaN is NaN)
    vv = torch.where(keep.any(2)[:, :: Hq // Hkv, :, None], v.to(p.dtype), 0)
    return _apply_v(p, vv, Hq // Hkv).to(q.dtype)


def decode_attention(q, k, v, kv_lens=None, scale=None, softcap=None) -> torch.Tensor:
    """Dense attention of one decode query per row over its KV cache.

    Args:
        q: (B, Hq, 1, d); k, v: (B, Hkv, S, d); kv_lens: (B,) valid keys per row (default S).
        scale: score scale; 1 / sqrt(d) by default. softcap: logit soft-cap c, or None.
    Returns:
        out: (B, Hq, 1, d) in q's dtype.
    """
    B, Hq, Hkv, S, d, kv_lens = _check_decode(q, k, v, kv_lens)
    keep = (torch.arange(S, device=q.device)[None] < kv_lens[:, None])  # (B, S)
    return _decode_softmax_out(q, k, v, keep[:, None].expand(B, Hkv, S), scale, softcap)


def decode_index_to_mask(block_index, block_count, nb: int) -> torch.Tensor:
    """The kept key blocks of a decode index as a (B, Hkv, nb) bool mask.

    Args:
        block_index: (B, Hkv, K) int, kept key blocks; only the first block_count entries count
            (the rest is padding of any value). Entries at or past nb are ignored.
        block_count: (B, Hkv) int, in [0, K].
        nb: key blocks of the cache.
    """
    if block_index.dim() != 3 or tuple(block_count.shape) != tuple(block_index.shape[:2]):
        raise ValueError(f"block_index must be (B, Hkv, K) and block_count (B, Hkv); got "
                         f"{tuple(block_index.shape)} and {tuple(block_count.shape)}")
    K = block_index.shape[-1]
    valid = torch.arange(K, device=block_index.device) < block_count[..., None].long()
    if bool((valid & (block_index < 0)).any()):
        raise ValueError("block_index holds negative block numbers among its counted entries")
    idx = torch.where(valid & (block_index < nb), block_index.long(), nb)
    mask = torch.zeros(*block_count.shape, nb + 1, dtype=torch.bool, device=block_index.device)
    return mask.scatter_(-1, idx, True)[..., :nb]


def sparse_decode_attention(q, k, v, block_index, block_count, block_size: int, kv_lens=None,
                            scale=None, softcap=None) -> torch.Tensor:
    """Attention of one decode query per row over the kept key blocks of its kv head.

    Args:
        q: (B, Hq, 1, d); k, v: (B, Hkv, S, d); kv_lens: (B,) valid keys per row (default S).
        block_index: (B, Hkv, K) int, the kept key blocks (ascending, no repeats), shared by the
            group's query heads; entries past block_count, and blocks starting at or after the
            row's kv_len, are ignored.
        block_count: (B, Hkv) int, how many entries of block_index count.
        block_size: b, tokens per key block.
        scale: score scale; 1 / sqrt(d) by default. softcap: logit soft-cap c, or None.
    Returns:
        out: (B, Hq, 1, d) in q's dtype; a head that keeps no valid key gives zeros.
    """
    B, Hq, Hkv, S, d, kv_lens = _check_decode(q, k, v, kv_lens)
    b = check_block_size(block_size)
    blocks = decode_index_to_mask(block_index, block_count, num_blocks(S, b))  # (B, Hkv, nb)
    pos = torch.arange(S, device=q.device)
    keep = blocks[..., pos // b] & (pos[None] < kv_lens[:, None])[:, None]  # (B, Hkv, S)
    return _decode_softmax_out(q, k, v, keep, scale, softcap)


def decode_block_truth(q, k, block_size: int, scale=None, positions=None,
                       softcap=None, pooling: str = "max") -> torch.Tensor:
    """The decode gate's ground truth (SeerAttention-R): for each query, its softmax attention
    over the keys, max-pooled over each key block's columns, then the max over the query heads
    of each kv group, normalized to sum 1 over the key blocks. pooling="mass" instead sums each
    block's columns and averages the group's heads: the share of the group's attention mass in
    each block, whose top-k is the selection of highest mean recall.

    Args:
        q: (B, Hq, Sq, d), queries at the last Sq positions of the keys (Sq = S: a causal
            prefill, every token a decode query of its own past; Sq = 1: one decode step).
        k: (B, Hkv, S, d) keys (post-RoPE, as attention sees them).
        block_size: b.
        scale: score scale; 1 / sqrt(d) by default.
        positions: (Sq,) int, the queries' positions among the keys (any subset of rows);
            default S - Sq .. S - 1.
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None.
        pooling: "max" (the gate's target) or "mass".
    Returns:
        truth: (B, Hkv, Sq, nb) float32 (float64 for float64 inputs), nb = ceil(S / b); 0 for
        blocks wholly after the query.
    """
    if pooling not in ("max", "mass"):
        raise ValueError(f"pooling must be 'max' or 'mass'; got {pooling!r}")
    B, Hq, Sq, d = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != d or k.shape[2] < Sq or Hq % k.shape[1]:
        raise ValueError(f"q must be (B, Hq, Sq, d) and k (B, Hkv, S, d) with S >= Sq and Hkv "
                         f"dividing Hq; got {tuple(q.shape)} and {tuple(k.shape)}")
    b = check_block_size(block_size)
    Hkv, S = k.shape[1], k.shape[2]
    nb, group = num_blocks(S, b), Hq // Hkv
    if positions is None:
        positions = torch.arange(S - Sq, S, device=q.device)
    if tuple(positions.shape) != (Sq,) or bool(((positions < 0) | (positions >= S)).any()):
        raise ValueError(f"positions must be ({Sq},) key positions in [0, {S}); got "
                         f"{tuple(positions.shape)}")
    positions = positions.to(q.device)
    scale, softcap = default_scale(d, scale), check_softcap(softcap)
    truth = torch.zeros(B, Hkv, Sq, nb, dtype=_compute_dtype(q), device=q.device)
    rows = _chunk_rows(B, Hq, S, 1)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        s = _scores(q, k, r0, r1, scale, softcap)  # (B, Hq, R, S)
        seen = torch.arange(S, device=q.device)[None, :] <= positions[r0:r1, None]  # (R, S)
        s = s.masked_fill(~seen, float("-inf"))
        p = torch.nn.functional.pad(_safe_softmax(s), (0, nb * b - S))  # zeros never win a max
        p = p.reshape(B, Hkv, group, r1 - r0, nb, b)
        m = p.amax(dim=(2, 5)) if pooling == "max" else p.sum(5).mean(2)  # (B, Hkv, R, nb)
        truth[:, :, r0:r1] = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    return truth


def row_sparse_attention(q, k, v, row_blocks, block_size: int, scale=None,
                         return_mass: bool = False, softcap=None):
    """Causal attention where each query row reads its own kept key blocks: decode sparsity,
    teacher-forced (every token of a prefill attends as it would as a decode step).

    Args:
        q: (B, Hq, S, d); k, v: (B, Hkv, S, d).
        row_blocks: (B, Hkv, S, nb) bool, the key blocks query row t keeps, shared by the query
            heads of each kv group; causality holds inside kept blocks.
        block_size: b.
        scale: score scale; 1 / sqrt(d) by default.
        return_mass: also return the recall of attention mass: the share of each row's dense
            (causal) attention that falls on the keys it keeps.
        softcap: logit soft-cap c (logits -> c * tanh(logits / c)), or None.
    Returns:
        out: (B, Hq, S, d) in q's dtype; a row with no kept key gives zeros.
        mass (with return_mass): (B, Hq, S) float32 (float64 for float64 inputs), in [0, 1].
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, v)
    b = check_block_size(block_size)
    nb = num_blocks(S, b)
    if not isinstance(row_blocks, torch.Tensor) or row_blocks.dtype != torch.bool or \
            tuple(row_blocks.shape) != (B, Hkv, S, nb):
        got = tuple(row_blocks.shape) if isinstance(row_blocks, torch.Tensor) else row_blocks
        raise ValueError(f"row_blocks must be a bool (B, Hkv, S, nb) = {(B, Hkv, S, nb)} tensor; "
                         f"got {got}")
    group, scale, softcap = Hq // Hkv, default_scale(d, scale), check_softcap(softcap)
    out = torch.empty_like(q)
    mass = torch.zeros(B, Hq, S, dtype=_compute_dtype(q), device=q.device) if return_mass else None
    key_block = torch.arange(S, device=q.device) // b
    rows = _chunk_rows(B, Hq, S, 1)
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        causal = _causal(r0, r1, S, q.device)
        keep = row_blocks[:, :, r0:r1][..., key_block] & causal
        keep = keep.repeat_interleave(group, dim=1)  # (B, Hq, R, S)
        s = _scores(q, k, r0, r1, scale, softcap)
        out[:, :, r0:r1] = _apply_v(_safe_softmax(s.masked_fill(~keep, float("-inf"))), v,
                                    group).to(q.dtype)
        if mass is not None:
            dense = _safe_softmax(s.masked_fill(~causal, float("-inf")))
            mass[:, :, r0:r1] = (dense * keep).sum(-1)
    return (out, mass) if return_mass else out
