"""Shared pieces of the kernels: input checks, the index entry format, the online-softmax step,
the logit soft-cap, launch config.

Imports only torch, triton and the oracle's validation helpers (`seerlib.reference`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seerlib.reference import check_block_size, check_qkv, default_scale

LOG2E = 1.4426950408889634
# Key block numbers and the row-half bits share one int32 index entry: block | (bits << 24).
ENTRY_BITS_SHIFT = 24
ENTRY_BLOCK_MASK = (1 << ENTRY_BITS_SHIFT) - 1
# The same constants as seen from inside @triton.jit (compiled Triton reads only constexpr globals).
ENTRY_SHIFT_TL = tl.constexpr(ENTRY_BITS_SHIFT)
ENTRY_BLOCK_MASK_TL = tl.constexpr(ENTRY_BLOCK_MASK)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(what: str, **tensors: torch.Tensor) -> None:
    """Refuse tensors that are not all on one device of the type the kernels run on here: CUDA,
    or the CPU under TRITON_INTERPRET=1. `what` names the kernel, the keywords the tensors."""
    want = "cpu" if interpreting() else "cuda"
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if first.type != want or any(d != first for d in devices.values()):
        got = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"the {what} runs on {want} tensors here (TRITON_INTERPRET="
                         f"{int(interpreting())}); got {got}")


def check_inputs(q, k, v, block_size=None):
    """Validate q (B, Hq, S, d), k, v (B, Hkv, S, d) for the kernels; return (B, Hq, Hkv, S, d)."""
    B, Hq, Hkv, S, d = check_qkv(q, k, v)
    if block_size is not None:
        check_block_size(block_size)
        if block_size not in (16, 32, 64, 128):
            raise ValueError(
                f"block_size must be one of 16, 32, 64, 128 for the kernels; got {block_size}"
            )
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128 for the kernels; got {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if interpreting():
        if q.device.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors; got {q.device}")
        if q.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the interpreter path takes float32 or float16; got {q.dtype}")
    else:
        if q.device.type != "cuda":
            raise ValueError(
                "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got "
                f"{q.device}. "
                "seerlib.ops dispatches to the reference on CPU."
            )
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"the Triton kernels take bfloat16 or float16 on GPU; got {q.dtype} "
                "(seerlib.ops runs other dtypes through the reference)"
            )
    return B, Hq, Hkv, S, d


def score_scales(d: int, scale, softcap) -> tuple[float, float]:
    """(qk_scale, cap_log2), what a kernel multiplies the raw products q.k by. Without a soft-cap:
    (scale * log2(e), 1.0), scores straight into the log2 domain. With soft-cap c:
    (scale / c, c * log2(e)), so that `soft_cap(s * qk_scale, cap_log2)` is
    c * tanh(scale * q.k / c) in the log2 domain and tanh(s * qk_scale) is the tanh itself."""
    sm_scale = default_scale(d, scale)
    if softcap is None:
        return sm_scale * LOG2E, 1.0
    return sm_scale / softcap, softcap * LOG2E


# On a GPU, tanh is the hardware's tanh.approx.f32 (one MUFU op, relative error about 2^-11, far
# below the bf16/fp16 inputs' rounding; FlashAttention's soft-cap uses it too); the interpreter
# runs no inline PTX, so there it is computed from exp2 (float32, absolute error a few 1e-8).
FAST_TANH_TL = tl.constexpr(not interpreting())


@triton.jit
def tanh(x):
    """tanh of a float32 tensor (Triton has no tl.tanh; libdevice's does not run under the
    interpreter). Never NaN or inf for finite x."""
    if FAST_TANH_TL:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) in (0, 1]; 2 log2(e) folded
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def check_out(out, like: torch.Tensor, name: str = "out") -> torch.Tensor:
    """An output buffer given by the caller (tests poison it) or a new one shaped like `like`."""
    if out is None:
        return torch.empty_like(like)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be {tuple(like.shape)} {like.dtype} on {like.device}; got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim")
    return out


def float32_buffer(buf, shape: tuple, device, name: str, dims: str) -> torch.Tensor:
    """A float32 side output (a pooled map, a target) given by the caller, checked, or a new one.

    Args:
        buf: the caller's buffer or None; shape: its expected shape, named by `dims` in errors
            ("(B, Hq, nb, nb)"); device: where it must live; name: the argument's name.
    """
    if buf is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    ok = (tuple(buf.shape) == tuple(shape) and buf.dtype == torch.float32
          and buf.device == device and buf.stride(-1) == 1)
    if not ok:
        raise ValueError(
            f"{name} must be {dims} = {tuple(shape)} float32 on {device} with a contiguous last "
            f"dim; got {tuple(buf.shape)} {buf.dtype} on {buf.device}"
        )
    return buf


def default_launch(block_m: int, d: int) -> dict:
    """num_warps / num_stages measured best on an H100 (bench/NOTES.md); the interpreter ignores
    them."""
    if block_m >= 128:
        return {"num_warps": 8, "num_stages": 3}
    return {"num_warps": 4, "num_stages": 3}


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, SAFE: tl.constexpr):
    """One online-softmax update with scores `s` already in the log2 domain.

    SAFE handles rows whose scores are all -inf so far (masked rows): they keep m = -inf,
    l = 0 and acc = 0 instead of producing NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SAFE:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Rescale, then let the dot accumulate into acc (on Hopper, wgmma accumulates in place
    # instead of adding a fresh product tile): the same math as acc * alpha + p @ v.
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc
