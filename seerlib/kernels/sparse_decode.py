"""Split-KV sparse decode attention (SeerAttention-R's decode step).

What it computes: `seerlib.reference.sparse_decode_attention`: one query per sequence (q_len 1)
over the kept key blocks of its kv head, the group's query heads sharing one list. Dense decode
is the same kernel over every block (`decode_attention`). With a logit soft-cap c (Gemma2), the
scaled scores x become c * tanh(x / c) before the mask and the softmax (SOFTCAP, a constexpr:
without it the kernel is the plain one; with it, one tanh more per score: `_common.tanh`).

How, in two launches:
1. `_decode_split`, one program per (batch, kv head, split). The group's G query heads are the
   rows of one tile (padded to 16, the smallest tensor-core M), so each K/V block is loaded once
   for the whole group. Split s walks entries [s·P, (s+1)·P) of the row's sorted block list
   (P = blocks per split, fixed on the host), each a b-wide key tile, with the online softmax;
   it stores its normalized partial output and its log2 sum-exp. Splitting the list is what
   lets batch 1 fill the GPU: at 32k tokens and 90% sparsity a row keeps ~51 blocks, 8 kv heads
   give 8 programs, split one block per program they give ~400.
2. `_decode_merge`, one program per (batch, query head): the log-sum-exp merge of its splits.
   With one split the first launch writes the output itself and the merge is skipped.

Sync-free: the counts and kv lengths are read on the device. Entries past the row's count, -1
padding, negative entries and blocks at or past the row's kv length are skipped (the reference
raises on negative counted entries; the kernel cannot check without a host sync). A head that
keeps no valid key gives zeros.

What it moves: K and V of the kept blocks, 2·b·d·2 bytes per block and kv head (bf16), plus q,
the partials (Hq·splits·(d + 1)·4 bytes per row) and the output; memory-bound: compare the kept
bytes over the time with the measured copy rate.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from seerlib.reference import check_block_size, check_decode_shapes, check_softcap, num_blocks

from ._common import check_kernel_device, check_out, interpreting, score_scales, softmax_step, tanh

__all__ = ["sparse_decode_attention", "decode_attention", "choose_splits"]

# Programs to aim for per streaming multiprocessor: enough to hide the load latency of a
# memory-bound loop (each program has few tiles in flight).
PROGRAMS_PER_SM = 4
MIN_ROWS = 16  # tl.dot's smallest M


@triton.jit
def _decode_split(
    Q, K, V, IDX, CNT, LENS, O, OP, LSEP,
    qk_scale, cap_log2,
    sqz, sqh,
    skz, skh, skn,
    svz, svh, svn,
    siz, sih,
    soz, soh,
    HKV, GROUP, S, K_W, N_SPLITS, PER_SPLIT,
    HEAD_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DIRECT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_LENS: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    z = pid // HKV
    kvh = pid % HKV

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows  # the group's query heads
    offs_d = tl.arange(0, HEAD_D)
    offs_n = tl.arange(0, BLOCK)

    q_ptr = Q + z.to(tl.int64) * sqz + heads[:, None].to(tl.int64) * sqh + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    k_base = K + z.to(tl.int64) * skz + kvh.to(tl.int64) * skh
    v_base = V + z.to(tl.int64) * svz + kvh.to(tl.int64) * svh
    idx_base = IDX + z.to(tl.int64) * siz + kvh.to(tl.int64) * sih

    if HAS_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(LENS + z), 0), S)
    else:
        kv_len = S
    count = tl.minimum(tl.maximum(tl.load(CNT + pid), 0), K_W)
    lo = split * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, count)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for e in range(lo, hi):
        j = tl.load(idx_base + e)
        pos = j * BLOCK + offs_n
        ok = (pos < kv_len) & (j >= 0)
        pos = tl.where(ok, pos, 0)
        kt = tl.load(k_base + pos[None, :].to(tl.int64) * skn + offs_d[:, None],
                     mask=ok[None, :], other=0.0)
        vt = tl.load(v_base + pos[:, None].to(tl.int64) * svn + offs_d[None, :],
                     mask=ok[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale
        if SOFTCAP:
            s = tanh(s) * cap_log2  # c * tanh(x / c) in the log2 domain (`score_scales`)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, vt, m_i, l_i, acc, True)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        o_ptr = O + z.to(tl.int64) * soz + heads[:, None].to(tl.int64) * soh + offs_d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (pid.to(tl.int64) * GROUP + rows) * N_SPLITS + split  # (B, Hq, splits) order
        tl.store(OP + part[:, None] * HEAD_D + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSEP + part, lse, mask=row_ok)


@triton.jit
def _decode_merge(
    OP, LSEP, O,
    soz, soh, HQ, N_SPLITS,
    HEAD_D: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    pid = tl.program_id(0)  # batch * Hq + head
    z = pid // HQ
    h = pid % HQ
    sp = tl.arange(0, SPLITS_P2)
    sp_ok = sp < N_SPLITS
    offs_d = tl.arange(0, HEAD_D)
    base = pid.to(tl.int64) * N_SPLITS
    lse = tl.load(LSEP + base + sp, mask=sp_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)  # 0 for empty splits
    parts = tl.load(OP + (base + sp[:, None]) * HEAD_D + offs_d[None, :], mask=sp_ok[:, None],
                    other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + z.to(tl.int64) * soz + h.to(tl.int64) * soh + offs_d, out.to(O.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(rows: int, width: int, sms: int) -> int:
    """Blocks per split for `rows` = B·Hkv lists of at most `width` blocks on a GPU of `sms`
    multiprocessors: enough splits for PROGRAMS_PER_SM programs per multiprocessor, never more
    splits than blocks."""
    if width <= 0:
        return 1
    splits = max(1, min(width, -(-PROGRAMS_PER_SM * sms // max(rows, 1))))
    return -(-width // splits)


def _check(q, k, v, block_size):
    B, Hq, Hkv, S, d = check_decode_shapes(q, k, v)
    b = check_block_size(block_size)
    if b not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be one of 16, 32, 64, 128 for the kernel; got {b}")
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128 for the kernel; got {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_kernel_device("decode kernel", q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v), ("q", q)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    return B, Hq, Hkv, S, d, b


def _check_index(block_index, block_count, B, Hkv, device):
    if (not isinstance(block_index, torch.Tensor) or block_index.dim() != 3
            or tuple(block_index.shape[:2]) != (B, Hkv)):
        got = tuple(block_index.shape) if isinstance(block_index, torch.Tensor) else block_index
        raise ValueError(f"block_index must be (B, Hkv, K) = ({B}, {Hkv}, K); got {got}")
    if not isinstance(block_count, torch.Tensor) or tuple(block_count.shape) != (B, Hkv):
        got = tuple(block_count.shape) if isinstance(block_count, torch.Tensor) else block_count
        raise ValueError(f"block_count must be (B, Hkv) = ({B}, {Hkv}); got {got}")
    for name, t in (("block_index", block_index), ("block_count", block_count)):
        if t.dtype != torch.int32 or t.device != device:
            raise ValueError(f"{name} must be int32 on {device}; got {t.dtype} on {t.device}")
    if block_index.stride(-1) != 1:
        raise ValueError("block_index must have a contiguous last dim")
    return block_count.contiguous()


def _lens(kv_lens, B, S, device):
    if kv_lens is None:
        return None  # every row holds S keys: the kernel reads no lengths (one launch fewer)
    if not isinstance(kv_lens, torch.Tensor) or tuple(kv_lens.shape) != (B,):
        got = tuple(kv_lens.shape) if isinstance(kv_lens, torch.Tensor) else kv_lens
        raise ValueError(f"kv_lens must be a (B,) = ({B},) integer tensor; got {got}")
    if kv_lens.is_floating_point() or kv_lens.device != device:
        raise ValueError(f"kv_lens must be integer on {device}; got {kv_lens.dtype} on "
                         f"{kv_lens.device}")
    return kv_lens.to(torch.int32).contiguous()


def sparse_decode_attention(q, k, v, block_index, block_count, block_size: int, kv_lens=None,
                            scale=None, *, out=None, blocks_per_split: int | None = None,
                            softcap: float | None = None):
    """One decode query per row over the kept key blocks of its kv head.

    Args:
        q: (B, Hq, 1, d); k, v: (B, Hkv, S, d) (any strides but a contiguous last dim: a slice
            of a preallocated cache is fine); kv_lens: (B,) int, valid keys per row (default S).
        block_index: (B, Hkv, K) int32, kept key blocks, ascending, then padding (-1);
            block_count: (B, Hkv) int32 entries that count (`seerlib.decode.select.decode_index`).
        block_size: b, tokens per key block (16, 32, 64 or 128).
        scale: score scale; 1 / sqrt(d) by default.
        out: optional (B, Hq, 1, d) buffer in q's dtype (tests poison it).
        blocks_per_split: P, index entries per program (default: `choose_splits`).
        softcap: logit soft-cap c (scaled scores x -> c * tanh(x / c)), or None.
    Returns:
        out: (B, Hq, 1, d) in q's dtype; zeros for a head that keeps no valid key.
    """
    B, Hq, Hkv, S, d, b = _check(q, k, v, block_size)
    softcap = check_softcap(softcap)
    count = _check_index(block_index, block_count, B, Hkv, q.device)
    lens = _lens(kv_lens, B, S, q.device)
    out = check_out(out, q)
    G = Hq // Hkv
    K_w = block_index.shape[-1]
    sms = _sm_count(q.device.index or 0) if q.device.type == "cuda" else 4
    P = blocks_per_split or choose_splits(B * Hkv, K_w, sms)
    if P < 1:
        raise ValueError(f"blocks_per_split must be >= 1; got {P}")
    n_splits = max(1, -(-K_w // P))
    direct = n_splits == 1
    if direct:
        parts = lse = out  # unused by the kernel when DIRECT
    else:
        parts = torch.empty((B, Hq, n_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, Hq, n_splits), dtype=torch.float32, device=q.device)
    qk_scale, cap_log2 = score_scales(d, scale, softcap)
    launch = {} if interpreting() else {"num_warps": 4, "num_stages": 3}
    _decode_split[(B * Hkv, n_splits)](
        q, k, v, block_index, count, count if lens is None else lens, out, parts, lse,
        qk_scale, cap_log2,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        block_index.stride(0), block_index.stride(1),
        out.stride(0), out.stride(1),
        Hkv, G, S, K_w, n_splits, P,
        HEAD_D=d, BLOCK=b, BLOCK_M=max(MIN_ROWS, triton.next_power_of_2(G)), DIRECT=direct,
        SOFTCAP=softcap is not None, HAS_LENS=lens is not None, **launch,
    )
    if not direct:
        _decode_merge[(B * Hq,)](
            parts, lse, out, out.stride(0), out.stride(1), Hq, n_splits,
            HEAD_D=d, SPLITS_P2=max(2, triton.next_power_of_2(n_splits)),
            **({} if interpreting() else {"num_warps": 4}),
        )
    return out


def decode_attention(q, k, v, kv_lens=None, scale=None, *, block_size: int = 64, out=None,
                     blocks_per_split: int | None = None, softcap: float | None = None):
    """Dense decode attention: the sparse kernel over every key block.

    Args: as `sparse_decode_attention` without the index; block_size is the key tile width.
    Returns: (B, Hq, 1, d) in q's dtype.
    """
    B, Hq, Hkv, S, d, b = _check(q, k, v, block_size)
    nb = num_blocks(S, b)
    index = torch.arange(nb, dtype=torch.int32, device=q.device).expand(B, Hkv, nb)
    count = torch.full((B, Hkv), nb, dtype=torch.int32, device=q.device)
    return sparse_decode_attention(q, k, v, index, count, b, kv_lens, scale, out=out,
                                   blocks_per_split=blocks_per_split, softcap=softcap)
