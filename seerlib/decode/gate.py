"""DecodeGate: the SeerAttention-R gate, which predicts which key blocks a decode query reads.

Per layer and kv head: the group's pre-RoPE query heads of one token are concatenated (G·d) and
projected to one gate head (d_gate), then rotated at the token's position; the keys of each full
block of b tokens are max-, min- and avg-pooled, concatenated, projected and rotated at the
block's first position. The logits q_gate · k_gateᵀ / sqrt(d_gate) over the key blocks are the
gate's prediction; every query head of a group reads the blocks its group's gate picks
(`seerlib.decode.select`). The projected block keys are what the K-compression cache holds
(`seerlib.decode.kcache`): one d_gate vector per block and kv head, about 1/(2b) of the KV cache
at d_gate = d.

Which blocks a query at position t can pick: the full blocks before its own, j < t // b. Its own
block (the newest, possibly partial one) is always read and has no cached key, so the gate never
scores it (logit -inf).

Shapes: q_pre (B, Hq, Sq, d) queries before RoPE at `positions` (Sq,); k_pre (B, Hkv, S, d) keys
before RoPE; logits (B, Hkv, Sq, nb) float32, nb = ceil(S / b).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seerlib.families import family_of
from seerlib.gate import BlockRoPE, _check_pool, pool_blocks
from seerlib.reference import check_block_size, default_scale

__all__ = ["DecodeGate", "DecodeGateSet", "candidate_blocks"]


def candidate_blocks(positions: torch.Tensor, nb: int, block_size: int) -> torch.Tensor:
    """(Sq, nb) bool: the key blocks a decode query at each position may pick, j < pos // b (the
    full blocks before its own; its own block is always read)."""
    j = torch.arange(nb, device=positions.device)
    return j[None, :] < (positions[:, None] // block_size)


class DecodeGate(nn.Module):
    """The decode gate of one attention layer.

    Args:
        num_heads: Hq; num_kv_heads: Hkv, a divisor of Hq (one gate head per kv head).
        head_dim: d.
        block_size: b, tokens per key block.
        rope: a `BlockRoPE` of rotary dim d_gate (shared by a gate set), or None.
        k_pool: pooling ops for K, default ("max", "min", "avg").
        d_gate: gate dim, default d.
    Parameters:
        q_proj: (Hkv, G * d, d_gate), G = Hq // Hkv; k_proj: (Hkv, len(k_pool) * d, d_gate);
        initialized normal(0, 0.02).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int = 64,
                 rope: BlockRoPE | None = None, k_pool: Sequence[str] = ("max", "min", "avg"),
                 d_gate: int | None = None):
        super().__init__()
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads}; num_heads={num_heads} needs a divisor of {num_heads}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.block_size = check_block_size(block_size)
        self.k_pool = _check_pool(k_pool, "K")
        self.d_gate = head_dim if d_gate is None else int(d_gate)
        if rope is not None and rope.dim != self.d_gate:
            raise ValueError(f"rope has rotary dim {rope.dim}; the gate dim is {self.d_gate}")
        self.rope = rope
        self.q_proj = nn.Parameter(torch.empty(num_kv_heads, self.group * head_dim, self.d_gate))
        self.k_proj = nn.Parameter(torch.empty(num_kv_heads, len(self.k_pool) * head_dim,
                                               self.d_gate))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.q_proj, 0.0, 0.02)
        nn.init.normal_(self.k_proj, 0.0, 0.02)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, k_pool={self.k_pool}, d_gate={self.d_gate}")

    def query(self, q_pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Gate queries: q_pre (B, Hq, Sq, d) at `positions` (Sq,) -> (B, Hkv, Sq, d_gate),
        rotated and scaled by 1 / sqrt(d_gate)."""
        B, Hq, Sq, d = q_pre.shape
        if (Hq, d) != (self.num_heads, self.head_dim):
            raise ValueError(f"q_pre has {Hq} heads of dim {d}; this gate expects "
                             f"{self.num_heads} of dim {self.head_dim}")
        if tuple(positions.shape) != (Sq,):
            raise ValueError(f"positions must be ({Sq},), one per query; got "
                             f"{tuple(positions.shape)}")
        # (B, Hq, Sq, d) -> (B, Hkv, G, Sq, d) -> (B, Hkv, Sq, G * d): a group's heads side by side
        q = q_pre.reshape(B, self.num_kv_heads, self.group, Sq, d).permute(0, 1, 3, 2, 4)
        q = torch.einsum("bhsc,hcg->bhsg", q.reshape(B, self.num_kv_heads, Sq, -1).to(
            self.q_proj.dtype), self.q_proj)  # (B, Hkv, Sq, d_gate)
        if self.rope is not None:
            q = self.rope.at(q, positions)
        return q * default_scale(self.d_gate)

    def pool(self, k_pre: torch.Tensor) -> torch.Tensor:
        """Pooled keys: k_pre (B, Hkv, S, d) -> (B, Hkv, nb, len(k_pool) * d) float32."""
        if k_pre.dim() != 4 or tuple(k_pre.shape[1::2]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"k_pre must be (B, Hkv, S, d) = (B, {self.num_kv_heads}, S, "
                             f"{self.head_dim}); got {tuple(k_pre.shape)}")
        return pool_blocks(k_pre, self.block_size, self.k_pool)

    def keys(self, k_pooled: torch.Tensor, first_block: int = 0) -> torch.Tensor:
        """Gate keys of pooled blocks first_block, first_block + 1, ...: (B, Hkv, n, c) ->
        (B, Hkv, n, d_gate), each rotated at its block's first token (what the K-compression cache
        stores)."""
        k = torch.einsum("bhnc,hcg->bhng", k_pooled.to(self.k_proj.dtype), self.k_proj)
        if self.rope is not None:
            n = k.shape[2]
            start = torch.arange(first_block, first_block + n, device=k.device) * self.block_size
            k = self.rope.at(k, start)
        return k

    def scores(self, q_gate: torch.Tensor, k_gate: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, Hkv, Sq, nb) float32 of gate queries (B, Hkv, Sq, d_gate) against gate keys
        (B, Hkv, nb, d_gate); -inf where a block is no candidate (`candidate_blocks`)."""
        logits = torch.matmul(q_gate, k_gate.transpose(-1, -2)).float()
        cand = candidate_blocks(positions.to(logits.device), k_gate.shape[2], self.block_size)
        return logits.masked_fill_(~cand, float("-inf"))

    def forward(self, q_pre: torch.Tensor, k_pre: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Decode logits for queries over the key blocks of k_pre.

        Args:
            q_pre: (B, Hq, Sq, d) pre-RoPE queries; k_pre: (B, Hkv, S, d) pre-RoPE keys.
            positions: (Sq,) token positions of the queries; default the last Sq of the S keys
                (S - Sq, ..., S - 1): Sq = S is a teacher-forced prefill, Sq = 1 one decode step.
        Returns:
            logits: (B, Hkv, Sq, nb) float32, -inf where a block is no candidate.
        """
        S, Sq = k_pre.shape[2], q_pre.shape[2]
        if positions is None:
            positions = torch.arange(S - Sq, S, device=q_pre.device)
        if q_pre.shape[0] != k_pre.shape[0]:
            raise ValueError(f"q_pre has batch {q_pre.shape[0]}; k_pre has {k_pre.shape[0]}")
        return self.scores(self.query(q_pre, positions), self.keys(self.pool(k_pre)), positions)


class DecodeGateSet(nn.Module):
    """One `DecodeGate` per decoder layer of a model, sharing one `BlockRoPE`: the decode-phase
    counterpart of `seerlib.gate.GateSet` (the same file format, `phase` "decode" in its
    metadata; `seerlib.io.load_gates` returns one for such a file).

    Attributes:
        block_size, k_pool, d_gate: the gate configuration; model_name; gates: nn.ModuleList.
    """

    phase = "decode"

    def __init__(self, config, block_size: int = 64, k_pool: Sequence[str] = ("max", "min", "avg"),
                 d_gate: int | None = None, model_name: str | None = None):
        super().__init__()
        L, Hq, Hkv, d = family_of(config).heads(config)
        self.config = config
        self.block_size = check_block_size(block_size)
        self.k_pool = _check_pool(k_pool, "K")
        self.d_gate = d if d_gate is None else int(d_gate)
        self.model_name = (model_name if model_name is not None
                           else (getattr(config, "_name_or_path", "") or ""))
        self.rope = BlockRoPE(config, self.d_gate)
        self.gates = nn.ModuleList(
            DecodeGate(Hq, Hkv, d, block_size, self.rope, self.k_pool, self.d_gate)
            for _ in range(L))

    @classmethod
    def from_config(cls, config, **kwargs) -> DecodeGateSet:
        return cls(config, **kwargs)

    def gate_config(self) -> dict:
        """The gate configuration as plain values (saved in the file's metadata)."""
        return {"phase": self.phase, "block_size": self.block_size, "k_pool": list(self.k_pool),
                "d_gate": self.d_gate}

    def __len__(self) -> int:
        return len(self.gates)

    def __getitem__(self, layer: int) -> DecodeGate:
        return self.gates[layer]
