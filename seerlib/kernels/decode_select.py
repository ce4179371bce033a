"""One decode step's block selection and the sparse decode kernel's index, in one launch.

What it computes: `seerlib.decode.select.decode_index(select_decode(scores, selection, position,
b), K)` for a single query per row (one decode step, every row at the same position t): which key
blocks each (batch, kv head) reads, as the sorted int32 list the sparse decode kernel takes.

A query at t sees key blocks 0 .. c, c = t // b. Its own block c and the forced blocks (the sink
rule: blocks 0 .. n-1; the local rule: the n blocks before c) are always read; the budget picks
among the rest, the candidates (visible, not forced, with a finite score):
- TOKENS: K_BUDGET blocks in all, the forced ones counted first (the token budget's tokens // b);
- DENSITY: ceil(density · (c + 1)) blocks in all, at least one;
- THRESHOLD: every candidate whose softmax over the candidates exceeds the threshold.
Equal scores at the cut go to the lower block (torch.topk leaves the order of ties open).

How: one program per (batch, kv head) holds the row's scores in registers (NB_P2 = the blocks
rounded up to a power of two). The k-th best score is found by a radix search over the scores'
order-preserving int32 keys (each pass counts the row at 16 or 8 thresholds in one reduction:
8 or 11 passes, no sort; a plain bisection's 32 passes cost 37 us at batch 1 / 32k on an H100,
block-wide reductions being latency-bound), and each kept block's slot
in the index is the running count of kept blocks before it (`tl.cumsum`), so the list comes out
ascending. No host sync: the position is read on the device, so one CUDA graph serves every step.
Before, the step ran ~25 small launches: the (nb, nb) forced-block mask, topk, a scatter, a sort
over every block and their masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_kernel_device, interpreting

__all__ = ["decode_select", "MODES", "MAX_BLOCKS"]

MODES = {"tokens": 0, "density": 1, "threshold": 2}
MAX_BLOCKS = 16384  # the widest row held in one program's registers (1M tokens at b = 64)


@triton.jit
def _order_key(s):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def select_row(S_ROW, IDX_ROW, CNT_AT, c, W, NB, K_W, K_BUDGET, SINK, LOCAL, DENS, threshold,
               MODE: tl.constexpr, NB_P2: tl.constexpr, K_P2: tl.constexpr,
               RADIX: tl.constexpr, PASSES: tl.constexpr, TAG: tl.constexpr):
    """One row: scores S_ROW[0 .. W) of a query in key block c -> its kept blocks at IDX_ROW
    (ascending, each OR'd with TAG, then -1, K_W entries) and their count at CNT_AT; returns the
    count."""
    j = tl.arange(0, NB_P2)
    visible = (j <= c) & (j < NB)
    forced = visible & ((j == c) | (j < SINK) | ((j >= c - LOCAL) & (j < c)))
    s = tl.load(S_ROW + j, mask=visible & (j < W), other=float("-inf")).to(tl.float32)
    s = tl.where(s == s, s, float("-inf"))  # NaN: no candidate
    cand = visible & (~forced) & (s > float("-inf"))

    if MODE == 2:  # threshold: the candidates' softmax
        m = tl.max(tl.where(cand, s, float("-inf")), 0)
        e = tl.where(cand, tl.exp(s - tl.where(m > float("-inf"), m, 0.0)), 0.0)
        total = tl.sum(e, 0)
        picked = cand & (e / tl.where(total > 0, total, 1.0) > threshold)
    else:
        if MODE == 0:
            k = K_BUDGET
        else:
            # in float64, as select_decode rounds it (a float32 density would round 0.1 · 10 up)
            k = tl.math.ceil(tl.load(DENS) * (c + 1).to(tl.float64) - 1e-9).to(tl.int32)
            k = tl.maximum(k, 1)
        n_forced = tl.sum(forced.to(tl.int32), 0)
        want = tl.maximum(k - n_forced, 0)  # candidates to add to the forced blocks
        key = _order_key(s).to(tl.int64)
        # the largest t with at least `want` candidates keyed >= t: each pass counts the
        # candidates at RADIX thresholds across [lo, hi] at once (one block-wide reduction) and
        # keeps the sub-range holding t, so PASSES = ceil(32 / log2(RADIX)) passes find it
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        steps = tl.arange(0, RADIX).to(tl.int64)
        for _ in range(PASSES):
            width = (hi - lo + RADIX) // RADIX  # ceil((hi - lo + 1) / RADIX)
            at = lo + steps * width  # (RADIX,) thresholds
            n = tl.sum((cand[:, None] & (key[:, None] >= at[None, :])).to(tl.int32), 0)
            i = tl.max(tl.where(n >= want, steps, 0), 0)  # counts fall with the threshold
            lo = lo + i * width
            hi = tl.minimum(hi, lo + width - 1)
        above = cand & (key > lo)
        tied = cand & (key == lo)
        room = want - tl.sum(above.to(tl.int32), 0)
        picked = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))
        picked = picked & (want > 0)

    kept = forced | picked
    slot = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(IDX_ROW + slot, j | TAG, mask=kept & (slot < K_W))
    count = tl.minimum(tl.sum(kept.to(tl.int32), 0), K_W)
    r = tl.arange(0, K_P2)
    tl.store(IDX_ROW + r, tl.full([K_P2], -1, tl.int32), mask=(r >= count) & (r < K_W))
    tl.store(CNT_AT, count)
    return count


@triton.jit
def _decode_select(
    S, POS, DENS, IDX, CNT,
    ssz, ssh, siz, sih,
    HKV, W, NB, K_W, K_BUDGET, SINK, LOCAL,
    threshold,
    BLOCK: tl.constexpr,
    MODE: tl.constexpr,
    NB_P2: tl.constexpr,
    K_P2: tl.constexpr,
    RADIX: tl.constexpr,
    PASSES: tl.constexpr,
):
    pid = tl.program_id(0)
    z = pid // HKV
    h = pid % HKV
    c = tl.load(POS).to(tl.int32) // BLOCK  # the query's own block
    select_row(S + z.to(tl.int64) * ssz + h.to(tl.int64) * ssh,
               IDX + z.to(tl.int64) * siz + h.to(tl.int64) * sih, CNT + pid,
               c, W, NB, K_W, K_BUDGET, SINK, LOCAL, DENS, threshold, MODE, NB_P2, K_P2, RADIX,
               PASSES, 0)


def row_launch(num_blocks: int, width: int, width_is: str, mode: str, position, device,
               max_blocks: int | None, density: float):
    """What both selection kernels' wrappers check and derive for rows of num_blocks blocks of
    which `width` are scored (`width_is` names them in the error): (nb, K, the density as a
    float64 device scalar or a stand-in, the row's constexprs, the launch options)."""
    nb = int(num_blocks)
    if not 1 <= nb <= MAX_BLOCKS or width > nb:
        raise ValueError(f"num_blocks must be in 1 .. {MAX_BLOCKS} and at least {width_is} "
                         f"{width}; got {nb}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}; got {mode!r}")
    if (not isinstance(position, torch.Tensor) or position.shape != (1,)
            or position.is_floating_point() or position.device != device):
        raise ValueError(f"position must be a (1,) integer tensor on {device}; got "
                         f"{position!r}")
    K = nb if max_blocks is None else min(int(max_blocks), nb)
    if K < 1:
        raise ValueError(f"max_blocks must be >= 1; got {max_blocks}")
    # the density as a float64 device scalar (a fill, not a host copy: no sync); unread outside
    # density mode, where the position stands in for it
    dens = torch.full((1,), float(density), dtype=torch.float64, device=device) \
        if mode == "density" else position
    nb_p2 = max(16, triton.next_power_of_2(nb))
    meta = {"NB_P2": nb_p2, "K_P2": max(16, triton.next_power_of_2(K)), **search_passes(nb_p2)}
    launch = {} if interpreting() else {"num_warps": 4 if nb_p2 <= 2048 else 8}
    return nb, K, dens, meta, launch


def search_passes(nb_p2: int) -> dict:
    """RADIX and PASSES (kernel keywords) of the k-th-score search for rows of nb_p2 blocks: 16
    thresholds per pass (8 passes) up to 1024 blocks, 8 (11 passes) above, where a 16-wide count
    would hold 16 values per block in registers."""
    radix = 16 if nb_p2 <= 1024 else 8
    return {"RADIX": radix, "PASSES": -(-32 // (radix.bit_length() - 1))}


def decode_select(scores: torch.Tensor, position: torch.Tensor, num_blocks: int,
                  block_size: int, *, mode: str, budget_blocks: int = 0, density: float = 0.0,
                  threshold: float = 0.0, sink: int = 0, local: int = 0,
                  max_blocks: int | None = None, out=None):
    """The kept key blocks of one decode step, as the sparse decode kernel's index.

    Args:
        scores: (B, Hkv, W) or (B, Hkv, 1, W) float block scores, higher = read first, W <= nb
            (blocks at or past W are no candidates; -inf / NaN neither); a contiguous last dim.
        position: (1,) integer tensor on the scores' device, the query's position t (its keys
            are 0 .. t); read on the device.
        num_blocks: nb, the key blocks of the KV cache (t // b < nb).
        block_size: b.
        mode: "tokens" (budget_blocks in all, forced included), "density" or "threshold".
        sink, local: the forced sink blocks and local blocks (0 = none); the own block always.
        max_blocks: K, the index width (default nb); a row keeping more keeps its first K.
        out: optional (index (B, Hkv, K) int32, count (B, Hkv) int32) buffers.
    Returns:
        (index (B, Hkv, K) int32: kept blocks ascending, then -1; count (B, Hkv) int32).
    """
    if scores.dim() == 4:
        if scores.shape[2] != 1:
            raise ValueError(f"scores must be (B, Hkv, 1, W) for one decode step; got "
                             f"{tuple(scores.shape)}")
        scores = scores[:, :, 0]
    if scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be (B, Hkv, W) float; got {tuple(scores.shape)} "
                         f"{scores.dtype}")
    B, Hkv, W = scores.shape
    nb, K, dens, meta, launch = row_launch(num_blocks, W, "the scores' width", mode, position,
                                           scores.device, max_blocks, density)
    check_kernel_device("decode selection kernel", scores=scores)
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if out is None:
        index = torch.empty(B, Hkv, K, dtype=torch.int32, device=scores.device)
        count = torch.empty(B, Hkv, dtype=torch.int32, device=scores.device)
    else:
        index, count = out
        if (tuple(index.shape) != (B, Hkv, K) or index.dtype != torch.int32
                or tuple(count.shape) != (B, Hkv) or count.dtype != torch.int32
                or not count.is_contiguous() or index.stride(-1) != 1):
            raise ValueError(f"out must be int32 buffers (B, Hkv, K) = ({B}, {Hkv}, {K}) and "
                             f"({B}, {Hkv}), contiguous")
    _decode_select[(B * Hkv,)](
        scores, position, dens, index, count,
        scores.stride(0), scores.stride(1), index.stride(0), index.stride(1),
        Hkv, W, nb, K, int(budget_blocks), int(sink), int(local),
        float(threshold),
        BLOCK=int(block_size), MODE=MODES[mode], **meta, **launch,
    )
    return index, count
