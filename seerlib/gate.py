"""AttnGate: a small learned predictor of block-level attention (SeerAttention, prefill).

Per layer, the gate pools the pre-RoPE queries and keys along the sequence into blocks of b tokens,
maps them by one small linear per query head, applies RoPE at each block's first-token position
with the model's own rope settings, and returns block-causal logits (B, Hq, nb, nb). Softmax over
the key blocks is the predicted block-importance distribution; `seerlib.select.select_blocks` turns
it into a block mask and `seerlib.distill` trains it against the pooled attention map.

Shapes: q_pre (B, Hq, S, d), k_pre (B, Hkv, S, d), Hq a multiple of Hkv (query head h reads kv head
h // (Hq // Hkv)); logits (B, Hq, nb, nb) float32 with nb = ceil(S / b), the last block possibly
partial, -inf above the block diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seerlib.families import family_of
from seerlib.reference import causal_block_mask, check_block_size, default_scale, num_blocks

__all__ = ["POOL_OPS", "AttnGate", "BlockRoPE", "GateSet", "pool_blocks"]

POOL_OPS = ("avg", "max", "min")


def _check_pool(pool: Sequence[str], side: str) -> tuple[str, ...]:
    if isinstance(pool, str):
        pool = (pool,)
    pool = tuple(pool)
    if not pool or any(p not in POOL_OPS for p in pool) or len(set(pool)) != len(pool):
        raise ValueError(
            f"{side} pooling must be a non-empty list of distinct ops from {POOL_OPS}; got {pool!r}"
        )
    return pool


def pool_blocks(x: torch.Tensor, block_size: int, ops: Sequence[str]) -> torch.Tensor:
    """Pool a sequence into blocks of `block_size` tokens (ceil mode: last block may be partial).

    Args:
        x: (B, H, S, d).
        block_size: b, tokens per block.
        ops: pooling ops from ("avg", "max", "min"); their results are concatenated on channels.
            A partial last block pools over its real tokens only.
    Returns:
        (B, H, nb, len(ops) * d) in float32 (float64 stays float64), nb = ceil(S / b).
    """
    ops = _check_pool(ops, "the")
    b = check_block_size(block_size)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, S, d); got shape {tuple(x.shape)}")
    B, H, S, d = x.shape
    nb = num_blocks(S, b)
    pad = nb * b - S
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = []
    for op in ops:
        # (B, H, S, d) -> (B, H, nb, b, d): a view when S is a multiple of b (no copy of x; the
        # reductions accumulate in `acc` and only the small (B, H, nb, d) result is converted)
        if op == "avg":
            xs = nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
            total = xs.reshape(B, H, nb, b, d).sum(dim=3, dtype=acc)
            count = torch.full((nb, 1), float(b), dtype=acc, device=x.device)
            count[-1] = b - pad
            out.append(total / count)  # (B, H, nb, d)
        else:
            fill = float("-inf") if op == "max" else float("inf")
            # padding never wins the max / min
            xs = nn.functional.pad(x, (0, 0, 0, pad), value=fill) if pad else x
            xs = xs.reshape(B, H, nb, b, d)
            out.append((xs.amax(dim=3) if op == "max" else xs.amin(dim=3)).to(acc))
    return torch.cat(out, dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class BlockRoPE(nn.Module):
    """RoPE at block-start positions, built from a transformers config's own rope settings.

    Uses the model family's rotary class (`seerlib.families`: `LlamaRotaryEmbedding` for most, with
    its rope init functions: rope theta, and any scaling such as linear, dynamic, YaRN, llama3) on a
    copy of the config whose head dim is the gate dim, so the rotary dim is `dim` (or the part of
    it the family rotates). Positions are the first token of each
    block: 0, b, 2b, ...

    The cos / sin are the model's own, YaRN's attention factor (`rotary.attention_scaling`)
    included, so at a block start they equal the model's rotary embedding's at that token. The
    frequencies (`inv_freq`) stay float32 whatever dtype the module is moved to
    (`.to(torch.bfloat16)` follows the device only); cos / sin are computed in float32 and rounded
    to the input's dtype, as the model does.

    Args:
        config: a transformers `PretrainedConfig` with rope settings (`rope_parameters`).
        dim: rotary dim (the gate dim d_gate), even.
    """

    def __init__(self, config, dim: int):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even int; got {dim}")
        self.dim = dim
        # the family's rotary class and its global layers' settings (Gemma3 keeps one per layer
        # type; Phi-3 may rotate part of the head dim), built by the adapter
        self.rotary = family_of(config).rotary_embedding(config, dim)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating buffer. A bf16 inv_freq (8 significant bits)
        # puts the angle at position p off by up to p / 256 rad, so each buffer keeps its float32
        # values and follows only the device `fn` moves it to.
        kept = [(m, name, buf) for m in self.modules()
                for name, buf in m.named_buffers(recurse=False) if buf.is_floating_point()]
        super()._apply(fn, recurse)
        for m, name, old in kept:
            new = getattr(m, name)
            if new.dtype != old.dtype:
                setattr(m, name, old.to(device=new.device))
        return self

    def forward(self, x: torch.Tensor, block_size: int) -> torch.Tensor:
        """Rotate x (B, H, nb, dim) as if block i sat at token position i * block_size."""
        return self.at(x, torch.arange(x.shape[2], device=x.device) * block_size)

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, n, dim) as if row i sat at token position positions[i] ((n,) int)."""
        pos = positions.to(x.device).unsqueeze(0)  # (1, n)
        cos, sin = self.rotary(x.float(), pos)  # (1, n, rot), rot <= dim
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (1, 1, n, rot)
        rot = cos.shape[-1]
        xr, xp = x[..., :rot], x[..., rot:]
        return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


class AttnGate(nn.Module):
    """The gate of one attention layer: pre-RoPE Q, K -> block-causal logits (B, Hq, nb, nb).

    Args:
        num_heads: Hq, query heads of the layer.
        num_kv_heads: Hkv, a divisor of Hq.
        head_dim: d, the model's head dim.
        block_size: b, tokens per block.
        rope: a `BlockRoPE` (shared by the layers of a gate set) or None for no rotary embedding.
        q_pool: pooling ops for Q, default ("avg",).
        k_pool: pooling ops for K, default ("max", "min", "avg").
        d_gate: gate dim, default d.
        q_linear: force (True) or drop (False) the Q linear; default: identity exactly when Q uses
            one pooling op and d_gate == d.
    Parameters:
        k_proj: (Hq, len(k_pool) * d, d_gate); q_proj (if any): (Hq, len(q_pool) * d, d_gate);
        initialized normal(0, 0.02).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 64,
        rope: BlockRoPE | None = None,
        q_pool: Sequence[str] = ("avg",),
        k_pool: Sequence[str] = ("max", "min", "avg"),
        d_gate: int | None = None,
        q_linear: bool | None = None,
    ):
        super().__init__()
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads}; num_heads={num_heads} needs a divisor of {num_heads}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = check_block_size(block_size)
        self.q_pool, self.k_pool = _check_pool(q_pool, "Q"), _check_pool(k_pool, "K")
        self.d_gate = head_dim if d_gate is None else int(d_gate)
        if rope is not None and rope.dim != self.d_gate:
            raise ValueError(f"rope has rotary dim {rope.dim}; the gate dim is {self.d_gate}")
        self.rope = rope
        if q_linear is None:
            q_linear = not (len(self.q_pool) == 1 and self.d_gate == head_dim)
        if not q_linear and len(self.q_pool) * head_dim != self.d_gate:
            raise ValueError(
                f"an identity Q branch needs len(q_pool) * head_dim == d_gate; got "
                f"{len(self.q_pool)} * {head_dim} != {self.d_gate}"
            )
        k_in, q_in = len(self.k_pool) * head_dim, len(self.q_pool) * head_dim
        self.k_proj = nn.Parameter(torch.empty(num_heads, k_in, self.d_gate))
        self.q_proj = nn.Parameter(torch.empty(num_heads, q_in, self.d_gate)) if q_linear else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.k_proj, 0.0, 0.02)
        if self.q_proj is not None:
            nn.init.normal_(self.q_proj, 0.0, 0.02)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, q_pool={self.q_pool}, k_pool={self.k_pool}, "
            f"d_gate={self.d_gate}, q_linear={self.q_proj is not None}"
        )

    def pool(self, q_pre: torch.Tensor, k_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool q (B, Hq, S, d), k (B, Hkv, S, d) -> (B, Hq, nb, nq * d), (B, Hkv, nb, nk * d)."""
        self.check_pre(q_pre, k_pre)
        return pool_blocks(q_pre, self.block_size, self.q_pool), pool_blocks(
            k_pre, self.block_size, self.k_pool
        )

    def check_pre(self, q_pre: torch.Tensor, k_pre: torch.Tensor) -> None:
        """Raise ValueError unless q_pre is (B, Hq, S, d) and k_pre (B, Hkv, S, d) for this gate."""
        if q_pre.dim() != 4 or k_pre.dim() != 4:
            raise ValueError(
                f"q_pre and k_pre must be 4-D (B, H, S, d); got {tuple(q_pre.shape)} and "
                f"{tuple(k_pre.shape)}"
            )
        B, Hq, S, d = q_pre.shape
        if (Hq, d) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"q_pre has {Hq} heads of dim {d}; this gate expects {self.num_heads} of dim "
                f"{self.head_dim}"
            )
        if tuple(k_pre.shape) != (B, self.num_kv_heads, S, d):
            raise ValueError(
                f"k_pre has shape {tuple(k_pre.shape)}; expected (B, Hkv, S, d) = "
                f"{(B, self.num_kv_heads, S, d)}"
            )

    def forward_pooled(self, q_pooled: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features (what `pool` returns; the distillation cache stores these).

        Args:
            q_pooled: (B, Hq, nb, len(q_pool) * d); k_pooled: (B, Hkv, nb, len(k_pool) * d).
        Returns:
            logits: (B, Hq, nb, nb) float32, -inf above the block diagonal.
        """
        logits = self.block_scores(q_pooled, k_pooled).float()
        above = ~causal_block_mask(logits.shape[-1], logits.device)
        return logits.masked_fill_(above, float("-inf"))  # (B, Hq, nb, nb)

    def block_scores(self, q_pooled: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
        """`forward_pooled`'s logits as a selection reads them: in the gate's dtype, with the
        entries above the block diagonal left as computed (`select_blocks` and `ops.select_index`
        ignore them), which saves a float copy and a fill over (B, Hq, nb, nb) per layer.

        Args / shapes: as `forward_pooled`. Returns: (B, Hq, nb, nb) in the parameters' dtype.
        """
        dt = self.k_proj.dtype
        q_pooled, k_pooled = q_pooled.to(dt), k_pooled.to(dt)
        group = self.num_heads // self.num_kv_heads
        # (B, Hkv, nb, c) -> (B, Hq, nb, c): query head h reads kv head h // group
        k = k_pooled.repeat_interleave(group, dim=1)
        k = torch.einsum("bhnc,hcg->bhng", k, self.k_proj)  # (B, Hq, nb, d_gate)
        q = q_pooled
        if self.q_proj is not None:
            q = torch.einsum("bhnc,hcg->bhng", q, self.q_proj)  # (B, Hq, nb, d_gate)
        if self.rope is not None:
            q, k = self.rope(q, self.block_size), self.rope(k, self.block_size)
        # the scale on the small q side, so the (B, Hq, nb, nb) logits are written once
        return torch.matmul(q * default_scale(self.d_gate), k.transpose(-1, -2))

    def forward(self, q_pre: torch.Tensor, k_pre: torch.Tensor) -> torch.Tensor:
        """Block-causal gate logits.

        Args:
            q_pre: (B, Hq, S, d) queries before RoPE; k_pre: (B, Hkv, S, d) keys before RoPE.
        Returns:
            logits: (B, Hq, nb, nb) float32, nb = ceil(S / b), -inf where key block > query block.
        """
        return self.forward_pooled(*self.pool(q_pre, k_pre))


def _config_heads(config) -> tuple[int, int, int, int]:
    """(num_layers, Hq, Hkv, head_dim) of a transformers decoder config, from its family's
    adapter."""
    return family_of(config).heads(config)


class GateSet(nn.Module):
    """One `AttnGate` per decoder layer of a model, sharing one `BlockRoPE`.

    Every layer has a gate, so `gates[i]` is layer i's in every family; `sparsify` reads the gates
    of the global layers only (a sliding-window layer keeps the model's own attention, see
    `seerlib.families`), and the sliding layers' gates stay unused.

    Build with `GateSet.from_config(model.config, block_size=64)`. `gates[i]` is layer i's gate;
    `forward({layer: (q_pre, k_pre)})` returns `{layer: logits (B, Hq, nb, nb)}`.

    Attributes:
        block_size, q_pool, k_pool, d_gate, q_linear: the gate configuration (same for all layers).
        model_name: the model's name or path as the config knows it ("" if none).
        gates: nn.ModuleList of AttnGate, one per layer.
    """

    def __init__(
        self,
        config,
        block_size: int = 64,
        q_pool: Sequence[str] = ("avg",),
        k_pool: Sequence[str] = ("max", "min", "avg"),
        d_gate: int | None = None,
        q_linear: bool | None = None,
        model_name: str | None = None,
    ):
        super().__init__()
        L, Hq, Hkv, d = _config_heads(config)
        self.config = config
        self.block_size = check_block_size(block_size)
        self.q_pool, self.k_pool = _check_pool(q_pool, "Q"), _check_pool(k_pool, "K")
        self.d_gate = d if d_gate is None else int(d_gate)
        self.model_name = (
            model_name if model_name is not None else (getattr(config, "_name_or_path", "") or "")
        )
        self.rope = BlockRoPE(config, self.d_gate)
        self.gates = nn.ModuleList(
            AttnGate(
                Hq, Hkv, d, block_size, self.rope, self.q_pool, self.k_pool, self.d_gate, q_linear
            )
            for _ in range(L)
        )
        self.q_linear = self.gates[0].q_proj is not None

    @classmethod
    def from_config(cls, config, **kwargs) -> GateSet:
        """A gate set for a transformers model config (see the class for the keyword options)."""
        return cls(config, **kwargs)

    def gate_config(self) -> dict:
        """The gate configuration as plain values (saved in checkpoint metadata)."""
        return {
            "block_size": self.block_size,
            "q_pool": list(self.q_pool),
            "k_pool": list(self.k_pool),
            "d_gate": self.d_gate,
            "q_linear": self.q_linear,
        }

    def __len__(self) -> int:
        return len(self.gates)

    def __getitem__(self, layer: int) -> AttnGate:
        return self.gates[layer]

    def forward(self, qk: dict) -> dict[int, torch.Tensor]:
        """{layer: (q_pre, k_pre)} -> {layer: logits (B, Hq, nb, nb)}."""
        return {i: self.gates[i](q, k) for i, (q, k) in qk.items()}
