"""The K-compression cache: the decode gate's key of every full block, kept beside the KV cache.

Per layer: `keys` (B, Hkv, n_full, d_gate), the pooled-and-projected key of each block whose b
tokens are all in the KV cache (rotated at its first position, as `DecodeGate.keys` makes them),
and the pre-RoPE keys of the newest, partial block, waiting for it to fill. A prefill adds its full
blocks at once; each decode step appends one key and, when that fills a block, adds the block's
gate key. The cache is about d_gate / (2 b d) of the KV cache (1/128 at b = 64, d_gate = d).

Token counts are kept on the host (the number of tokens appended is known from shapes), so an
update never waits for the GPU.
"""

from __future__ import annotations

import torch

__all__ = ["KCompressionCache"]


class KCompressionCache:
    """The gate keys of one layer's full key blocks, for one batch of sequences.

    Args:
        gate: the layer's `DecodeGate` (its block size, pooling and projection).
    Attributes:
        tokens: keys appended so far (the KV cache's length).
        keys: (B, Hkv, n_full, d_gate) or None before the first update.
    """

    def __init__(self, gate):
        self.gate = gate
        self.tokens = 0
        self.keys: torch.Tensor | None = None
        self._tail: torch.Tensor | None = None  # (B, Hkv, r, d) pre-RoPE keys, r < b

    @property
    def n_full(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reset(self) -> None:
        self.tokens, self.keys, self._tail = 0, None, None

    @torch.no_grad()
    def update(self, k_pre: torch.Tensor) -> None:
        """Append pre-RoPE keys (B, Hkv, n, d) at positions tokens .. tokens + n - 1; every block
        they complete gets its gate key."""
        b = self.gate.block_size
        if self._tail is not None and self._tail.shape[0] != k_pre.shape[0]:
            raise ValueError(f"the K-compression cache holds {self._tail.shape[0]} sequences; got "
                             f"keys for {k_pre.shape[0]} (call reset() for a new batch)")
        x = k_pre if self._tail is None else torch.cat([self._tail, k_pre], dim=2)
        full = x.shape[2] // b
        if full:
            pooled = self.gate.pool(x[:, :, : full * b])  # (B, Hkv, full, c)
            new = self.gate.keys(pooled, first_block=self.n_full)  # (B, Hkv, full, d_gate)
            self.keys = new if self.keys is None else torch.cat([self.keys, new], dim=2)
        self._tail = x[:, :, full * b:]
        self.tokens += k_pre.shape[2]

    def nbytes(self) -> int:
        """Bytes held (the gate keys and the partial block's keys)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self._tail) if t is not None)
