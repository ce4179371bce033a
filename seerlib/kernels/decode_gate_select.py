"""The decode gate's whole step in one launch: its query, its logits over the K-compression
cache, the selection and the sparse decode kernel's index.

What it computes, per (batch, kv head), for one decode query at position t:
1. the gate query (`seerlib.decode.gate.DecodeGate.query`): the group's G pre-RoPE query heads
   side by side (G·d) times q_proj[kv head] (G·d, d_gate), rotated at t (RoPE, rotate-half, with
   the rotary's inv_freq and attention scaling) and scaled by 1 / sqrt(d_gate);
2. its logits against the n cached gate keys (B, Hkv, n, d_gate), written to `logits`;
3. the selection and index of `seerlib.kernels.decode_select` over those logits (the own, partial
   block and the forced blocks always; the budget's best of the rest).
Everything is float32 inside (the torch path rounds the query to the gate's dtype twice, so on
bf16 gates the logits differ from it by bf16 rounding).

How: one program per (batch, kv head). The projection runs over the G·d inputs in chunks, each
half of the rotary dims on its own so the rotation needs no shuffle; the logits go over the cached
blocks in chunks to the (B, Hkv, n) output, and after a barrier the program reads its row back
into registers for the selection. When B·Hkv programs would leave most of the GPU idle (batch 1:
8 programs, each reading 512 KB of gate keys at 128k), each row's logits are split over several
programs (each recomputing the small query) and `decode_select` selects them in a second launch.
The position is read on the device: no host sync, one CUDA graph for every step. This
replaces ~18 small launches of the gate's query and logits (reshape, einsum, the rotary's cos /
sin, rotate-half, scale, matmul) and the selection's ~25.

Applies where the gate's rotary is the plain rotate-half one with a fixed inv_freq over all of
d_gate (`fusable`: Llama's rotary class with rope types default, linear, llama3, yarn, or no rope);
`seerlib.ops.decode_gate_select` takes the two-launch path otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_kernel_device
from .decode_select import MODES, decode_select, row_launch, select_row

__all__ = ["decode_gate_select", "fusable", "logit_splits"]

PLAIN_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init


@triton.jit
def _decode_gate_select(
    Q, WQ, INVF, KG, POS, DENS, LOGITS, IDX, CNT,
    sqz, sqh, swh, swc, skz, skh, skn, slz, slh, siz, sih,
    HKV, GROUP, W, NB, K_W, K_BUDGET, SINK, LOCAL,
    threshold, rope_scale, qk_scale,
    PER_PROGRAM,
    HEAD_D: tl.constexpr,
    HALF: tl.constexpr,
    ROPE: tl.constexpr,
    SELECT: tl.constexpr,
    CHUNK_C: tl.constexpr,
    CHUNK_N: tl.constexpr,
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
    t = tl.load(POS).to(tl.int32)
    g = tl.arange(0, HALF)

    # 1. the gate query's two rotary halves: x (G·d) @ q_proj[h] (G·d, 2 HALF), float32
    q1 = tl.zeros([HALF], dtype=tl.float32)
    q2 = tl.zeros([HALF], dtype=tl.float32)
    w_base = WQ + h.to(tl.int64) * swh
    for c0 in range(0, GROUP * HEAD_D, CHUNK_C):
        cc = c0 + tl.arange(0, CHUNK_C)
        ok = cc < GROUP * HEAD_D
        head = h * GROUP + cc // HEAD_D
        x = tl.load(Q + z.to(tl.int64) * sqz + head.to(tl.int64) * sqh + cc % HEAD_D, mask=ok,
                    other=0.0).to(tl.float32)
        w_rows = w_base + cc[:, None].to(tl.int64) * swc
        w1 = tl.load(w_rows + g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        w2 = tl.load(w_rows + HALF + g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        q1 += tl.sum(x[:, None] * w1, 0)
        q2 += tl.sum(x[:, None] * w2, 0)
    if ROPE:  # rotate-half at t: (q1, q2) -> (q1 cos - q2 sin, q2 cos + q1 sin)
        angle = t.to(tl.float32) * tl.load(INVF + g)
        cos = tl.cos(angle) * rope_scale
        sin = tl.sin(angle) * rope_scale
        r1 = (q1 * cos - q2 * sin) * qk_scale
        r2 = (q2 * cos + q1 * sin) * qk_scale
    else:
        r1 = q1 * qk_scale
        r2 = q2 * qk_scale

    # 2. logits over the cached blocks (this program's PER_PROGRAM of them), to (B, Hkv, W)
    k_base = KG + z.to(tl.int64) * skz + h.to(tl.int64) * skh
    l_row = LOGITS + z.to(tl.int64) * slz + h.to(tl.int64) * slh
    lo = tl.program_id(1) * PER_PROGRAM
    hi = tl.minimum(lo + PER_PROGRAM, W)  # this program's blocks only, whatever CHUNK_N
    for n0 in range(lo, hi, CHUNK_N):
        n = n0 + tl.arange(0, CHUNK_N)
        ok = n < hi
        k_rows = k_base + n[:, None].to(tl.int64) * skn
        k1 = tl.load(k_rows + g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(k_rows + HALF + g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k1 * r1[None, :], 1) + tl.sum(k2 * r2[None, :], 1)
        tl.store(l_row + n, s, mask=ok)
    if SELECT:  # one program holds the whole row: select it here
        tl.debug_barrier()  # the row's logits, written by every thread, are read back below
        # 3. selection and index
        select_row(l_row, IDX + z.to(tl.int64) * siz + h.to(tl.int64) * sih, CNT + pid,
                   t // BLOCK, W, NB, K_W, K_BUDGET, SINK, LOCAL, DENS, threshold, MODE, NB_P2,
                   K_P2, RADIX, PASSES, 0)


def fusable(gate) -> bool:
    """Whether the gate's step can run fused: no rope, or Llama's rotary class with a rope type
    whose inv_freq is fixed at init, rotating all of d_gate."""
    if gate.rope is None:
        return True
    # Lazy: transformers' Llama module is imported only when a gate asks.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = gate.rope.rotary
    return (type(rot) is LlamaRotaryEmbedding and getattr(rot, "rope_type", None)
            in PLAIN_ROPE_TYPES and rot.inv_freq.numel() * 2 == gate.d_gate)


def logit_splits(rows: int, width: int, sms: int) -> int:
    """Cached blocks per program: all of a row (one launch) when the rows fill half the GPU, else
    the row's logits split over programs (at least 64 blocks each), selected by a second launch."""
    if 2 * rows >= sms or width <= 128:
        return max(width, 1)
    parts = min(-(-2 * sms // rows), -(-width // 64))
    per = -(-width // parts)
    return -(-per // 32) * 32  # whole CHUNK_N chunks


def decode_gate_select(gate, q_pre: torch.Tensor, k_gate: torch.Tensor, position: torch.Tensor,
                       num_blocks: int, *, mode: str, budget_blocks: int = 0,
                       density: float = 0.0, threshold: float = 0.0, sink: int = 0,
                       local: int = 0, max_blocks: int | None = None,
                       blocks_per_program: int | None = None, chunk_c: int = 32,
                       chunk_n: int = 32, num_warps: int | None = None):
    """The decode gate's step for one query per row, in one launch.

    Args:
        gate: the layer's `DecodeGate` (`fusable(gate)`).
        q_pre: (B, Hq, 1, d) pre-RoPE queries (a contiguous last dim).
        k_gate: (B, Hkv, n, d_gate) the K-compression cache's gate keys of the n full blocks.
        position: (1,) integer tensor, the query's position t; num_blocks: nb (t // b < nb).
        mode, budget_blocks, density, threshold, sink, local, max_blocks: as
            `seerlib.kernels.decode_select.decode_select`.
        blocks_per_program: cached blocks whose logits one program computes (default
            `logit_splits`: the whole row, in one launch, when B·Hkv fills the GPU; else the
            logits of a row spread over programs, then `decode_select` on them).
        chunk_c, chunk_n: the query projection's input channels and the cached blocks one loop
            step takes (powers of two, 16 .. 256); num_warps: the launch's (default 4, 8 past
            2048 blocks). Tune options (`bench/tune_decode_index.py`); every choice gives the
            same index.
    Returns:
        (index (B, Hkv, K) int32, count (B, Hkv) int32, logits (B, Hkv, n) float32).
    """
    if not fusable(gate):
        raise ValueError("this gate's rotary is not the plain rotate-half one the fused step "
                         "computes (see fusable); use ops.decode_gate_select")
    B, Hq, Sq, d = q_pre.shape
    if (Sq, Hq, d) != (1, gate.num_heads, gate.head_dim):
        raise ValueError(f"q_pre must be (B, {gate.num_heads}, 1, {gate.head_dim}); got "
                         f"{tuple(q_pre.shape)}")
    Hkv, dg = gate.num_kv_heads, gate.d_gate
    if k_gate.dim() != 4 or tuple(k_gate.shape[:2]) != (B, Hkv) or k_gate.shape[3] != dg:
        raise ValueError(f"k_gate must be (B, Hkv, n, d_gate) = ({B}, {Hkv}, n, {dg}); got "
                         f"{tuple(k_gate.shape)}")
    if dg % 2 or dg & (dg - 1) or dg < 16:
        raise ValueError(f"the fused step takes a power-of-two d_gate >= 16; got {dg}")
    for name, v in (("chunk_c", chunk_c), ("chunk_n", chunk_n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v > 256 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two in 16 .. 256; got {v!r}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16; got {num_warps!r}")
    W, dev = k_gate.shape[2], q_pre.device
    nb, K, dens, meta, launch = row_launch(num_blocks, W, "the cached blocks", mode, position,
                                           dev, max_blocks, density)
    if num_warps is not None and launch:  # (the interpreter takes no launch options)
        launch = {**launch, "num_warps": num_warps}
    check_kernel_device("fused gate step", q_pre=q_pre, k_gate=k_gate, q_proj=gate.q_proj)
    q_pre = q_pre if q_pre.stride(-1) == 1 else q_pre.contiguous()
    k_gate = k_gate if k_gate.stride(-1) == 1 else k_gate.contiguous()
    wq = gate.q_proj.detach()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    index = torch.empty(B, Hkv, K, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    logits = torch.empty(B, Hkv, max(W, 1), dtype=torch.float32, device=dev)[:, :, :W]
    rope = gate.rope is not None
    invf = gate.rope.rotary.inv_freq.float() if rope else logits  # unread without ROPE
    scaling = float(gate.rope.rotary.attention_scaling) if rope else 1.0
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    per = int(blocks_per_program or logit_splits(B * Hkv, W, sms))
    if per < 1:
        raise ValueError(f"blocks_per_program must be >= 1; got {blocks_per_program}")
    splits = max(1, -(-W // per))
    _decode_gate_select[(B * Hkv, splits)](
        q_pre, wq, invf, k_gate, position, dens, logits, index, count,
        q_pre.stride(0), q_pre.stride(1), wq.stride(0), wq.stride(1),
        k_gate.stride(0), k_gate.stride(1), k_gate.stride(2),
        logits.stride(0), logits.stride(1), index.stride(0), index.stride(1),
        Hkv, gate.group, W, nb, K, int(budget_blocks), int(sink), int(local),
        float(threshold), scaling, 1.0 / math.sqrt(dg), per,
        HEAD_D=d, HALF=dg // 2, ROPE=rope, SELECT=splits == 1, CHUNK_C=chunk_c, CHUNK_N=chunk_n,
        BLOCK=gate.block_size, MODE=MODES[mode], **meta, **launch,
    )
    if splits > 1:  # the row's logits came from several programs: select them in a second launch
        decode_select(logits, position, nb, gate.block_size, mode=mode,
                      budget_blocks=budget_blocks, density=density, threshold=threshold,
                      sink=sink, local=local, max_blocks=K, out=(index, count))
    return index, count, logits
