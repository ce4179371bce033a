"""Generation with decode sparsity inside transformers' `generate`.

    with sparse_generation(model, "gate@tok=1024", decode_gates=gates) as sg:
        out = model.generate(ids, max_new_tokens=256)
    sg.stats.kept_share

Every attention layer is routed through `seerlib.capture.attention_override`:
- a **prefill** call (as many queries as keys) runs dense (the model's own attention), or sparse
  through a `seerlib.integrate.Sparsified` when `prefill=` names a prefill config; for method
  "gate" it fills each layer's K-compression cache (`seerlib.decode.kcache`) with the prompt's
  full blocks, from the pre-RoPE keys taken by `seerlib.capture.pre_rope_hooks`;
- a **decode step** (one query per sequence) appends the new key to the K-compression cache, scores
  the key blocks and selects them (`seerlib.decode.methods.step_index`: as `select_decode` then
  `decode_index`, the newest block always, the forced ones, the budget's best; for the gate, its
  query, logits, selection and index in one kernel launch on CUDA, no host sync) and attends over
  them with
  `seerlib.ops.sparse_decode_attention` (the Triton split-KV kernel on CUDA, the reference on CPU),
  reading transformers' own KV cache in place; of the soft-capped logits on a model that caps
  them (Gemma2's `softcap`, passed by the model to its attention function), as its own attention.

Sliding-window layers (Gemma2/3's, by family: `seerlib.families`) keep the model's own attention
and its window at every step, as under `sparsify`.

A prefill resets the per-layer state, so one handle serves many `generate` calls. Batches of
equal-length, unpadded prompts only (a padded prompt is refused at its prefill). A token budget
that covers the context reads every block: the tokens are those of dense decoding (tested). Quest
recomputes its per-block min/max from the cache at each step: a quality baseline, not a fast path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seerlib import ops
from seerlib.capture import AttentionSwitch, attention_layers
from seerlib.families import family_of
from seerlib.integrate import _check_no_padding, sparsify
from seerlib.reference import num_blocks

from .kcache import KCompressionCache
from .methods import DecodeConfig, DecodeInputs, parse_decode_config, step_index
from .select import most_blocks
from .teacher import _check_decode_gates

__all__ = ["GenerationStats", "SparseGeneration", "sparse_generation"]


class GenerationStats:
    """Decode steps since `reset()`: kept and visible key blocks, summed over layers, batch and kv
    heads (device counts; reading a property syncs once).

    Attributes:
        steps: decode calls (layers × steps); prefills: prefill calls.
        kept_share: kept share of the visible key blocks over all decode steps.
    """

    def __init__(self):
        self._kept: list[torch.Tensor] = []
        self._visible = 0
        self.steps = self.prefills = 0

    def add(self, count: torch.Tensor, visible_blocks: int) -> None:
        self._kept.append(count.sum())
        self._visible += count.numel() * visible_blocks
        self.steps += 1

    def reset(self) -> None:
        self._kept.clear()
        self._visible = self.steps = self.prefills = 0

    @property
    def kept_blocks(self) -> int:
        return int(torch.stack(self._kept).sum()) if self._kept else 0

    @property
    def kept_share(self) -> float:
        return self.kept_blocks / self._visible if self._visible else math.nan

    def as_dict(self) -> dict:
        return {"steps": self.steps, "prefills": self.prefills, "kept_share": self.kept_share}


class SparseGeneration(AttentionSwitch):
    """A model whose decode steps run sparse. Made by `sparse_generation`; a context manager
    (or `enable()` / `disable()`)."""

    def __init__(self, model: nn.Module, config: DecodeConfig, decode_gates=None, prefill=None):
        super().__init__(model)
        self.config, self.gates = config, decode_gates
        self.family = family_of(model)
        self.prefill = prefill  # a disabled Sparsified, or None
        if prefill is not None:
            prefill._pre = self._pre  # one set of hooks feeds both
        self.stats = GenerationStats()
        self.caches: dict[int, KCompressionCache] = {}
        self.last_index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._k = most_blocks(config.selection, config.block_size)

    def _wants_pre_rope(self) -> bool:
        return self.config.spec.needs_gate or (self.prefill is not None
                                               and self.prefill.config.spec.needs_gate)

    def _on_disable(self) -> None:
        self.caches.clear()

    def _attend(self, module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        B, Hq, Sq, d = query.shape
        Sk = key.shape[2]
        cfg, mc = self.config, self.model.config
        sliding = self.family.keeps_own_attention(mc, layer, Sk)  # the model's window, dense
        if Sq == Sk:  # a prefill: a new sequence starts
            _check_no_padding(attention_mask, Sq, window=self.family.layer_window(mc, layer))
            self.stats.prefills += 1
            if cfg.spec.needs_gate and not sliding:
                cache = self.caches.setdefault(layer, KCompressionCache(self.gates[layer]))
                cache.reset()
                cache.update(self._pre[layer]["k_pre"])
            if self.prefill is not None:
                return self.prefill._attend(module, query, key, value, attention_mask,
                                            default=default, **kwargs)
            self._pre.pop(layer, None)
            return default(module, query, key, value, attention_mask, **kwargs)
        if Sq != 1:
            raise NotImplementedError(f"sparse generation takes a prefill then one token per step; "
                                      f"layer {layer} got {Sq} queries against {Sk} keys")
        pre = self._pre.pop(layer, None)
        if not cfg.spec.sparse or sliding:
            return default(module, query, key, value, attention_mask, **kwargs)
        positions = torch.full((1,), Sk - 1, device=query.device, dtype=torch.long)
        k_gate = None
        if cfg.spec.needs_gate:
            cache = self.caches[layer]
            if cache.tokens != Sk - 1:
                raise RuntimeError(f"layer {layer}: the K-compression cache holds {cache.tokens} "
                                   f"tokens but the KV cache {Sk - 1} before this step (a cache "
                                   "edited outside generate?)")
            cache.update(pre["k_pre"])
            k_gate = cache.keys
        scale, softcap = kwargs.get("scaling"), kwargs.get("softcap")  # softcap: Gemma2's, or None
        b = cfg.block_size
        inputs = DecodeInputs(query, key, positions, b, scale=scale, softcap=softcap,
                              gate=self.gates[layer] if self.gates is not None else None,
                              q_pre=pre["q_pre"] if pre else None, k_gate=k_gate,
                              k_pre=None if k_gate is not None else (pre or {}).get("k_pre"))
        # scores -> the kernel's index in one launch on CUDA (the gate's query included)
        index, count = step_index(cfg, inputs, self._k)
        self.last_index[layer] = (index, count)
        self.stats.add(count, num_blocks(Sk, b))
        out = ops.sparse_decode_attention(query, key, value, index, count, b, scale=scale,
                                          softcap=softcap)
        return out.transpose(1, 2).contiguous(), None  # (B, 1, Hq, d), like transformers


def sparse_generation(model: nn.Module, config, *, decode_gates=None, prefill=None,
                      gates=None, block_size: int | None = None) -> SparseGeneration:
    """Make a transformers model's decode steps sparse (SeerAttention-R) for `generate`.

    Args:
        model: a transformers causal LM (`seerlib.families`).
        config: a `DecodeConfig` or its label ("gate@tok=1024", "quest@tok=512",
            "sink_window@tok=1024", "oracle@tok=1024", "dense").
        decode_gates: a `DecodeGateSet` for method "gate" (`seerlib.io.load_gates(path, model,
            phase="decode")`).
        prefill: None (dense prefill) or a prefill config for `seerlib.integrate.sparsify`
            (a preset name, a label or a SparseConfig), with `gates=` its GateSet.
        block_size: with a label, its block size (default: the decode gates', else 64).
    Returns:
        a `SparseGeneration` handle (context manager).
    """
    if isinstance(config, str):
        b = block_size or getattr(decode_gates, "block_size", None) or 64
        config = parse_decode_config(config, b)
    if not isinstance(config, DecodeConfig):
        raise ValueError(f"config must be a DecodeConfig or its label; got {type(config).__name__}")
    if config.spec.needs_gate:
        _check_decode_gates(decode_gates, model, config.block_size)
    elif decode_gates is not None:
        raise ValueError(f"decode method {config.method!r} reads no gate; got decode_gates")
    attention_layers(model)  # fails early on a model without attention layers
    pre = sparsify(model, prefill, gates=gates) if prefill is not None else None
    if pre is None and gates is not None:
        raise ValueError("gates= is the prefill's GateSet; give prefill= a config too")
    return SparseGeneration(model, config, decode_gates, pre)
