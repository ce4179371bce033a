"""What the attention benchmarks share besides the kernels: the block masks they time (random,
sink + local window), the realized sparsity, the peers (SDPA flash and cuDNN, FlexAttention) and
the relative error the checks report.

`bench_attention.py` (its sweep and, through `_attention_tune.py`, its tune) and
`bench_backward.py` (through `bench_attention`) use them; bench/ is on sys.path, so this is
imported as `_attention_peers`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seerlib import reference as ref

# ---------------------------------------------------------------------------------------------
# masks


def random_mask(B, H, nb, sparsity, device, seed=0):
    """Keep the diagonal and each lower block with the probability that gives `sparsity`."""
    causal = nb * (nb + 1) / 2
    off = nb * (nb - 1) / 2
    p = 1.0 if off == 0 else min(1.0, max(0.0, ((1 - sparsity) * causal - nb) / off))
    g = torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(B, H, nb, nb, device=device, generator=g) < p
    mask &= torch.ones(nb, nb, dtype=torch.bool, device=device).tril_(-1)
    mask |= torch.eye(nb, dtype=torch.bool, device=device)
    return mask


def sink_window_mask(B, H, nb, sparsity, device):
    """Block 0 (sink) plus the w most recent blocks, w chosen so the kept share is near 1 - s."""
    i = torch.arange(nb, dtype=torch.float64)
    causal = nb * (nb + 1) / 2
    best, best_err = nb, float("inf")
    for w in range(1, nb + 1):
        kept = torch.minimum(i + 1, torch.full_like(i, w) + (i - w + 1 > 0).double()).sum().item()
        err = abs(kept / causal - (1 - sparsity))
        if err < best_err:
            best, best_err = w, err
    qi = torch.arange(nb, device=device).view(nb, 1)
    kj = torch.arange(nb, device=device).view(1, nb)
    m = ((kj <= qi) & (kj > qi - best)) | ((kj == 0) & (qi >= 0))
    return m.expand(B, H, nb, nb).contiguous()


def realized_sparsity(mask):
    nb = mask.shape[-1]
    kept = (mask & torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril_()).sum().item()
    return 1.0 - kept / (mask.shape[0] * mask.shape[1] * nb * (nb + 1) / 2)


# ---------------------------------------------------------------------------------------------
# providers


def flex_setup():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def make(mask, S, b):
        nb = mask.shape[-1]
        strict = mask & torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril_(-1)
        full_counts, full_idx = ref.mask_to_index(strict)
        diag = torch.diagonal(mask, dim1=-2, dim2=-1)  # (B, H, nb)
        part_counts = diag.to(torch.int32)
        part_idx = torch.zeros(*mask.shape, dtype=torch.int32, device=mask.device)
        part_idx[..., 0] = torch.arange(nb, device=mask.device, dtype=torch.int32)
        return BlockMask.from_kv_blocks(
            part_counts,
            part_idx,
            full_counts,
            full_idx.clamp_min(0).contiguous(),
            BLOCK_SIZE=b,
            mask_mod=causal,
            seq_lengths=(S, S),
        )

    def run(q, k, v, block_mask, b, kernel_options="auto"):
        # "auto": 64-row tiles on a 64-block mask (the forward's choice), else Flex's defaults
        if kernel_options == "auto":
            kernel_options = {"BLOCK_M": 64, "BLOCK_N": 64} if b == 64 else None
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True,
                        kernel_options=kernel_options)

    return make, run


def sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    with sdpa_kernel(be):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_fn(q, k, v, backend):
    """A callable for SDPA; falls back to repeated K/V (built outside the timing) if GQA fails."""
    try:
        sdpa(q, k, v, backend)
        return lambda: sdpa(q, k, v, backend), "enable_gqa"
    except RuntimeError:
        g = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

        def run():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        run()
        return run, "repeated_kv"


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
