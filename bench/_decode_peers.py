"""What `bench_decode.py` measures seerlib's decode step against, and how it times things.

- `time_ms`: the median of a call, `triton.testing.do_bench` on CUDA (L2 flushed between calls),
  wall clock on a CPU.
- `copy_rate`: the GPU's device-to-device copy rate in the same process (bytes read + written over
  the time of one large `Tensor.copy_`), the ceiling a memory-bound decode step is compared with.
- SDPA (`sdpa_cudnn`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math`): one decode query per row,
  `F.scaled_dot_product_attention(q, k, v, enable_gqa=True)` under `sdpa_kernel(backend)`; a
  backend that refuses enable_gqa gets K/V repeated to the query heads (recorded, and its bytes
  counted as the repeated tensors).
- FlexAttention: `flex_attention(q, k, v, block_mask=..., enable_gqa=True)`, compiled on CUDA
  (`dynamic=False`: one compile per shape), eager on a CPU (where it only checks the block mask's
  meaning: eager flex applies `mask_mod` to every score). `flex_block_mask` lists a decode index's
  kept blocks as full blocks of each query head.

Shapes: q (B, Hq, 1, d); k, v (B, Hkv, S, d); block_index (B, Hkv, K) int32, block_count
(B, Hkv) int32 (`seerlib.decode.select.decode_index`).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention, noop_mask

SDPA = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
FLEX_Q_BLOCK = 128  # flex's query tile; one tile holds the single decode query
FLEX_RECOMPILES = 128  # dynamo's recompile limit while flex compiles once per (B, S) shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int = 100, warmup: int = 25) -> float:
    """Median ms of `fn()`.

    CUDA: `triton.testing.do_bench(fn, warmup=warmup, rep=reps, return_mode="median")`, warmup
    and rep in milliseconds of device time, the L2 cache cleared before each call. CPU: the
    median wall clock of max(3, reps // 25) calls after one warm-up call.
    """
    if device.type == "cuda":
        # lazy: triton is imported on CUDA runs only (a CPU run sets TRITON_INTERPRET first)
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=reps, return_mode="median"))
    fn()
    samples = []
    for _ in range(max(3, reps // 25)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_rate(device: torch.device, nbytes: int | None = None) -> dict:
    """The device-to-device copy rate: {"copy_gbs", "copy_bytes", "copy_ms"}; bytes = read +
    written (2 · nbytes). Default size 2 GiB on CUDA (far past L2), 64 MiB on a CPU."""
    n = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    src = dst = None  # freed before the cases are made
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_gbs": 2 * n / (ms * 1e-3) / 1e9, "copy_bytes": 2 * n, "copy_ms": ms}


# ------------------------------------------------------------------------------------- SDPA


def sdpa_call(provider: str, q, k, v):
    """(fn, how): a no-argument call of SDPA's `provider` backend on one decode query per row,
    and how K/V reach it ("enable_gqa" or "repeated_kv (why)"). Raises the backend's error when
    it refuses the shape both ways (the caller records it)."""
    backend = SDPA[provider]

    def gqa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    try:
        gqa()
        return gqa, "enable_gqa"
    except RuntimeError as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, Hkv, S, d) -> Hq heads

    def repeated():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kk, vv)

    repeated()
    return repeated, f"repeated_kv (enable_gqa failed: {why})"


# ------------------------------------------------------------------------------------- Flex


def flex_block_mask(block_index, block_count, num_heads: int, kv_len: int, block_size: int,
                    keep: torch.Tensor | None = None) -> BlockMask:
    """A FlexAttention `BlockMask` of one decode query per row reading a decode index's blocks.

    Args:
        block_index: (B, Hkv, K) int32, kept blocks then -1 padding; block_count: (B, Hkv).
        num_heads: Hq; each kv head's list serves its group of Hq // Hkv query heads.
        kv_len: S; block_size: b (the mask's KV block size).
        keep: (B, Hkv, nb) bool, the same selection as a mask: when given, `mask_mod` encodes it
            (for eager flex, which ignores the block lists); otherwise `mask_mod` is a no-op and
            the kept blocks are full blocks (compiled flex reads only them, masking nothing).
    Returns:
        BlockMask with seq_lengths (1, S), BLOCK_SIZE (FLEX_Q_BLOCK, b), every kept block full;
        its block lists are (B, Hq, 1, nb) (flex wants them as wide as the KV blocks).
    """
    g = num_heads // block_index.shape[1]
    nb = -(-kv_len // block_size)
    # (B, Hkv, K) -> (B, Hq, 1, nb): flex's lists are as wide as the KV blocks, -1 padding -> 0
    idx = F.pad(block_index, (0, nb - block_index.shape[-1])).clamp_min(0)
    idx = idx.repeat_interleave(g, 1)[:, :, None].contiguous()
    cnt = block_count.repeat_interleave(g, 1)[:, :, None].to(torch.int32)  # (B, Hq, 1)
    mask_mod = noop_mask
    if keep is not None:
        kept = keep.repeat_interleave(g, 1)  # (B, Hq, nb)

        def mask_mod(b, h, q_idx, kv_idx):
            return kept[b, h, kv_idx // block_size]

    return BlockMask.from_kv_blocks(torch.zeros_like(cnt), idx, cnt, idx,
                                    BLOCK_SIZE=(FLEX_Q_BLOCK, block_size), mask_mod=mask_mod,
                                    seq_lengths=(1, kv_len))


_COMPILED = {}


def compiled_flex():
    """`torch.compile(flex_attention, dynamic=False)`, made once per process, with dynamo's
    recompile limit raised to FLEX_RECOMPILES (each (B, S) and block mask shape compiles anew;
    past the default limit of 8 dynamo would silently run flex eagerly)."""
    if "flex" not in _COMPILED:
        import torch._dynamo  # lazy: only the compiled (CUDA) flex rows need dynamo's config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name,
                        max(getattr(torch._dynamo.config, name), FLEX_RECOMPILES))
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def flex_call(q, k, v, block_mask: BlockMask | None, compiled: bool):
    """(fn, compile_s): a no-argument flex call (dense when block_mask is None) and the seconds
    its first call (the compile, when compiled) took."""
    flex = compiled_flex() if compiled else flex_attention
    if not compiled:  # eager flex is this benchmark's CPU check, where its warning is expected
        warnings.filterwarnings("ignore", message=r"flex_attention called without torch\.compile")

    def fn():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    sync(q.device)
    t0 = time.perf_counter()
    fn()
    sync(q.device)
    return fn, time.perf_counter() - t0
