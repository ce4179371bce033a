"""Teacher-forced decode sparsity: a whole window in one forward, every token attending over its
past exactly as it would as a decode step under a `DecodeConfig`.

    with decode_teacher_forced(model, parse_decode_config("gate@tok=1024"), gates) as tf:
        nll = model(ids).logits ...           # the perplexity of sparse decoding
    tf.stats.recall, tf.stats.kept_tokens

Each attention layer is routed through `seerlib.capture.attention_override`: the method scores the
key blocks of every query position (`seerlib.decode.methods`), `select_decode` picks each query's
blocks (its own block always), and `reference.row_sparse_attention` attends over them, one
selection per kv group. This is not a prefill block mask: query t's selection is its own (rows of
one query block may read different blocks), as at generation, which `seerlib.decode.generate`
runs step by step with the sparse decode kernel; the two agree token for token (tested).

Sliding-window layers (Gemma2/3's, by family: `seerlib.families`) keep the model's own attention
and its window, as under `sparsify`; they enter no statistics.

Statistics (`DecodeStats`) are taken over the *scored* queries, those at or after `score_from`
(default: the second half of the window, where the past is long enough for a budget to drop
blocks): the recall of attention mass (share of each query head's dense attention on the keys
it reads) and the tokens read per query.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seerlib.capture import AttentionSwitch
from seerlib.families import family_of
from seerlib.integrate import _check_no_padding
from seerlib.io import config_hash
from seerlib.reference import row_sparse_attention

from .gate import DecodeGateSet
from .methods import DecodeConfig, DecodeInputs, decode_scores
from .select import select_decode, visible_blocks

__all__ = ["DecodeStats", "TeacherForced", "decode_teacher_forced"]


class DecodeStats:
    """Sums over layers and calls since `reset()`: recall of attention mass and tokens read, over
    the scored queries of each window.

    Attributes:
        recall: mean share of dense attention mass on the keys read (nan before any call).
        kept_tokens: mean keys read per scored query (tokens of its kept blocks that it may see).
        context_tokens: mean keys a scored query could read (its position + 1).
        per_layer_recall: {layer: mean recall}.
        recall_p10: the mean over layers of the 10th percentile of recall over a layer's
            (query head, scored query) pairs: the tail that a mean hides.
    """

    def __init__(self):
        self._recall: dict[int, list] = {}
        self._p10: list = []
        self._kept: list = []
        self._context: list = []

    def add(self, layer: int, mass: torch.Tensor, kept: torch.Tensor, context: torch.Tensor):
        self._recall.setdefault(layer, []).append(mass.double().mean())
        flat = mass.double().flatten()  # kthvalue: no size limit, unlike torch.quantile
        self._p10.append(flat.kthvalue(max(1, math.ceil(0.1 * flat.numel()))).values)
        self._kept.append(kept.double().mean())
        self._context.append(context.double().mean())

    def reset(self) -> None:
        self._recall.clear()
        self._p10.clear()
        self._kept.clear()
        self._context.clear()

    @property
    def recall_p10(self) -> float:
        return float(torch.stack(self._p10).mean()) if self._p10 else math.nan

    @property
    def per_layer_recall(self) -> dict[int, float]:
        return {i: float(torch.stack(v).mean()) for i, v in sorted(self._recall.items())}

    @property
    def recall(self) -> float:
        vals = list(self.per_layer_recall.values())
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def kept_tokens(self) -> float:
        return float(torch.stack(self._kept).mean()) if self._kept else math.nan

    @property
    def context_tokens(self) -> float:
        return float(torch.stack(self._context).mean()) if self._context else math.nan

    def as_dict(self) -> dict:
        return {"recall": self.recall, "recall_p10": self.recall_p10,
                "kept_tokens": self.kept_tokens, "context_tokens": self.context_tokens}


def kept_token_counts(keep: torch.Tensor, positions: torch.Tensor, block_size: int):
    """Keys each query reads (B, Hkv, Sq): the tokens of its kept blocks at or before it."""
    nb = keep.shape[-1]
    start = torch.arange(nb, device=keep.device) * block_size  # (nb,)
    seen = (positions[:, None] + 1 - start[None, :]).clamp(0, block_size)  # (Sq, nb)
    return (keep * seen).sum(-1)


class TeacherForced(AttentionSwitch):
    """A model whose attention runs teacher-forced decode sparsity. Made by
    `decode_teacher_forced`; a context manager (`enable()` / `disable()` for the permanent form).
    """

    def __init__(self, model: nn.Module, config: DecodeConfig, gates=None,
                 score_from: float | int = 0.5, prefix: int = 0):
        super().__init__(model)
        self.config, self.gates = config, gates
        self.family = family_of(model)
        self.score_from, self.prefix = score_from, prefix
        self.stats = DecodeStats()
        self.masks: dict[int, torch.Tensor] = {}
        self.record_masks = False

    def _wants_pre_rope(self) -> bool:
        return self.config.spec.needs_gate

    def _first_scored(self, S: int) -> int:
        f = self.score_from
        return int(f * S) if isinstance(f, float) else int(f)

    def _attend(self, module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        pre = self._pre.pop(layer, None)
        B, Hq, S, d = query.shape
        if key.shape[2] != S:
            raise ValueError(f"teacher-forced decode runs whole windows (use_cache=False); layer "
                             f"{layer} got {S} queries against {key.shape[2]} keys")
        _check_no_padding(attention_mask, S, window=self.family.layer_window(self.model.config,
                                                                             layer))
        if self.family.keeps_own_attention(self.model.config, layer, S):
            return default(module, query, key, value, attention_mask, **kwargs)  # its window
        cfg, b = self.config, self.config.block_size
        positions = torch.arange(S, device=query.device)
        gate = self.gates[layer] if self.gates is not None else None
        softcap = kwargs.get("softcap")  # Gemma2's attn_logit_softcapping, None elsewhere
        inputs = DecodeInputs(query, key, positions, b, scale=kwargs.get("scaling"), gate=gate,
                              softcap=softcap,
                              q_pre=pre["q_pre"] if pre else None,
                              k_pre=pre["k_pre"] if pre else None)
        keep = select_decode(decode_scores(cfg, inputs), cfg.selection, positions, b)
        if self.prefix:  # the prompt, as a dense prefill reads it
            keep[:, :, : self.prefix] = visible_blocks(positions[: self.prefix], keep.shape[-1], b)
        if self.record_masks:
            self.masks[layer] = keep
        out, mass = row_sparse_attention(query, key, value, keep, b, scale=kwargs.get("scaling"),
                                         return_mass=True, softcap=softcap)
        r0 = min(self._first_scored(S), S - 1)
        self.stats.add(layer, mass[:, :, r0:], kept_token_counts(keep[:, :, r0:],
                                                                 positions[r0:], b),
                       positions[r0:] + 1)
        return out.transpose(1, 2).contiguous(), None  # (B, S, Hq, d), like transformers


def decode_teacher_forced(model: nn.Module, config: DecodeConfig, gates=None,
                          score_from: float | int = 0.5, prefix: int = 0) -> TeacherForced:
    """Run a model's forwards as teacher-forced decode sparsity under `config`.

    Args:
        model: a transformers causal LM (`seerlib.families`).
        config: the DecodeConfig (method "dense" too: the same path with every block read, so
            its recall is 1 and its logits the model's own up to rounding).
        gates: a `DecodeGateSet` for method "gate".
        score_from: first scored query of a window for the statistics: a share of its length
            (float) or a position (int).
        prefix: the first `prefix` tokens attend densely, as a dense prefill of a prompt of that
            length would (0: every token is a decode step).
    Returns:
        a `TeacherForced` handle (context manager).
    """
    if not isinstance(config, DecodeConfig):
        raise ValueError(f"config must be a DecodeConfig (seerlib.decode.parse_decode_config); "
                         f"got {type(config).__name__}")
    if config.spec.needs_gate:
        _check_decode_gates(gates, model, config.block_size)
    elif gates is not None:
        raise ValueError(f"decode method {config.method!r} reads no gate; got gates")
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"prefix must be a whole number of tokens >= 0; got {prefix!r}")
    return TeacherForced(model, config, gates, score_from, prefix)


def _check_decode_gates(gates, model, block_size: int) -> None:
    if not isinstance(gates, DecodeGateSet):
        raise ValueError(f"decode method 'gate' needs a DecodeGateSet (seerlib.io.load_gates of a "
                         f"decode gate file); got {type(gates).__name__}")
    have, want = config_hash(gates.config), config_hash(model.config)
    if have != want:
        raise ValueError(f"these decode gates were built for model {gates.model_name!r} (config "
                         f"hash {have}); this model hashes to {want}")
    if gates.block_size != block_size:
        raise ValueError(f"the decode gates work at block size {gates.block_size}; the config "
                         f"has {block_size}")
