"""Decode-gate self-distillation (SeerAttention-R): `DecodeDistiller`, the same loop as
`Distiller` with the frozen model in it.

The decode target is per query row ((B, Hkv, S, nb), 16 times the prefill map at 8k tokens), so it
is not cached: each step runs the frozen model over its windows (`targets.capture_decode_targets`)
and keeps, for `rows` sampled query positions past the first quarter (and past the first block),
the pre-RoPE queries, the block-pooled keys and the target. The loss per layer is
KL(target over the candidate blocks ‖ softmax(gate logits)), the candidates being the full blocks
before each query's own (`seerlib.decode.gate.candidate_blocks`; its own block is always read),
averaged over batch, kv heads and rows, summed over layers. The recall reported is the target's
mass on the blocks a token budget keeps (the pooled proxy; `seerlib.eval.decode` measures the
real attention mass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seerlib.decode.gate import DecodeGateSet, candidate_blocks
from seerlib.decode.select import select_decode
from seerlib.distill.train import Distiller
from seerlib.metrics import kl_div
from seerlib.select import Selection
from seerlib.targets import capture_decode_targets, decode_target_source

__all__ = ["DecodeDistiller", "decode_target_rows"]


def decode_target_rows(seq_len: int, block_size: int, rows: int | None, generator) -> torch.Tensor:
    """(R,) ascending query positions to train on: `rows` drawn from [max(S / 4, b), S) (all of
    them when rows is None or more than there are)."""
    lo = max(seq_len // 4, block_size)
    if lo >= seq_len:
        raise ValueError(f"windows of {seq_len} tokens leave no query past the first quarter and "
                         f"the first block of {block_size}; use longer windows")
    n = seq_len - lo
    if rows is None or rows >= n:
        return torch.arange(lo, seq_len)
    return torch.randperm(n, generator=generator)[:rows].sort().values + lo


class _DecodeGates(nn.Module):
    """DecodeGateSet logits over captured rows, so DistributedDataParallel sees one forward."""

    def __init__(self, gates: DecodeGateSet):
        super().__init__()
        self.gates = gates

    def forward(self, batch: dict, rows: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, (q, pooled, _) in batch.items():
            g = self.gates[i]
            k = torch.cat([pooled[op] for op in g.k_pool], dim=-1)
            out.append(g.scores(g.query(q, rows), g.keys(k), rows))  # (B, Hkv, R, nb)
        return out


def _targets_over_candidates(truth: torch.Tensor, rows: torch.Tensor, block_size: int):
    """The target restricted to each row's candidate blocks and renormalized (B, Hkv, R, nb)."""
    cand = candidate_blocks(rows, truth.shape[-1], block_size)
    t = truth * cand
    return t / t.sum(-1, keepdim=True).clamp_min(1e-30)


@dataclass
class DecodeDistiller(Distiller):
    """Train a `DecodeGateSet` against the frozen model's decode targets.

    Args (beyond `Distiller`'s gates, cfg, device; `cache` and `eval_cache` unused):
        model: the frozen transformers model, on `device`.
        windows: (N, S) training token ids; eval_windows: (M, S) held-out ids or None.
        rows: query rows sampled per step for the loss (None: every row past the first quarter).
        target: "kernel" or "exact" (`seerlib.targets.capture_decode_targets`; default: kernel
            on CUDA, exact elsewhere).
        pooling: the target's pooling, "max" (SeerAttention-R's) or "mass" (each block's share
            of the group's attention mass; target "exact").
    `cfg.recall_tokens` are the token budgets of the reported recall.
    """

    cache: object = None
    model: nn.Module | None = None
    windows: torch.Tensor | None = None
    eval_windows: torch.Tensor | None = None
    rows: int | None = 1024
    target: str | None = None
    pooling: str = "max"

    def _check_data(self) -> None:
        if not isinstance(self.gates, DecodeGateSet):
            raise ValueError(f"DecodeDistiller trains a DecodeGateSet; got "
                             f"{type(self.gates).__name__}")
        if self.model is None or not isinstance(self.windows, torch.Tensor) or \
                self.windows.dim() != 2:
            raise ValueError("DecodeDistiller needs model= and windows= (N, S) token ids")
        if self.cfg.block_size != self.gates.block_size:
            raise ValueError(f"block sizes differ: config {self.cfg.block_size}, gates "
                             f"{self.gates.block_size}")
        self.target = decode_target_source(self.pooling, self.target, self.device)
        self.eval_cache = self.eval_windows  # Distiller.steps evaluates when it is set
        decode_target_rows(self.windows.shape[1], self.gates.block_size, self.rows, None)

    def _module(self) -> nn.Module:
        return _DecodeGates(self.gates)

    def _target_options(self) -> dict:
        return {"rows": self.rows, "target": self.target, "pooling": self.pooling}

    def state(self) -> dict:
        return {**super().state(), "decode": self._target_options()}

    def load_checkpoint(self, path) -> dict:
        """As `Distiller.load_checkpoint`, refusing a run whose decode target differs (rows,
        target source, pooling; a checkpoint from before they were recorded is taken as is)."""
        st = super().load_checkpoint(path)
        saved, want = st.get("decode"), self._target_options()
        if saved is not None and saved != want:
            diff = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in want.items()
                             if saved.get(k) != v)
            raise ValueError(f"{path} was trained with another decode target: {diff}; resume "
                             "with the same options")
        return st

    def _num_windows(self) -> int:
        return len(self.windows)

    def _seq_len(self) -> int:
        return self.windows.shape[1]

    def _capture(self, ids: torch.Tensor, rows: torch.Tensor) -> dict:
        return capture_decode_targets(self.model, ids.to(self.device), self.gates.block_size,
                                      rows.to(self.device), self.target, pooling=self.pooling)

    def _losses(self, batch: dict, logits: list[torch.Tensor], rows: torch.Tensor):
        b = self.gates.block_size
        per_layer = [kl_div(_targets_over_candidates(t, rows, b), lg)
                     for (_, _, t), lg in zip(batch.values(), logits, strict=True)]
        return torch.stack(per_layer).sum(), per_layer

    @torch.no_grad()
    def _decode_recall(self, batch: dict, logits: list[torch.Tensor], rows) -> dict[str, float]:
        out = {}
        for tokens in self.cfg.recall_tokens:
            vals = []
            for (_, _, t), lg in zip(batch.values(), logits, strict=True):
                keep = select_decode(lg, Selection(tokens=tokens), rows, self.gates.block_size)
                vals.append((t * keep).sum(-1).mean())
            out[str(tokens)] = float(torch.stack(vals).mean())
        return out

    def _batch_loss(self, idx: list[int]):
        # the rows of a step depend on (seed, step) only, so a resumed run draws the same ones
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.step)
        rows = decode_target_rows(self._seq_len(), self.gates.block_size, self.rows, g)
        rows = rows.to(self.device)
        batch = self._capture(self.windows[idx], rows)
        self.module.train()
        logits = self.module(batch, rows)
        loss, per_layer = self._losses(batch, logits, rows)
        return loss, per_layer, lambda: self._decode_recall(
            batch, [lg.detach() for lg in logits], rows)

    @torch.no_grad()
    def evaluate(self, cache=None) -> dict:
        """Mean loss and recall (pooled proxy) over the held-out windows (every row past the
        first quarter)."""
        windows = self.eval_windows if cache is None else cache
        rows = decode_target_rows(windows.shape[1], self.gates.block_size, None,
                                  None).to(self.device)
        losses, recalls = [], []
        for n in range(len(windows)):
            batch = self._capture(windows[n : n + 1], rows)
            logits = _DecodeGates(self.gates)(batch, rows)
            losses.append(float(self._losses(batch, logits, rows)[0]))
            recalls.append(self._decode_recall(batch, logits, rows))
        return {"loss": sum(losses) / len(losses),
                "recall": {k: sum(r[k] for r in recalls) / len(recalls) for k in recalls[0]}}
