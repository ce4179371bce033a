"""SeerAttention inside a transformers model: block-sparse prefill in one line.

    with sparsify(model, "recommended", gates=gates) as sp:    # a preset
        logits = model(input_ids).logits
    print(sp.stats.achieved_density)

`sparsify(model, config)` takes a `SparseConfig`, a preset name (`seerlib.methods.PRESETS`), a
label ("gate+sink@0.3", "oracle-max@t=0.01") or a method name with `selection=Selection(...)`.
Every attention layer is routed through a function of ours registered in transformers'
AttentionInterface (`seerlib.capture.attention_override`); the gate reads the pre-RoPE Q/K taken by
forward hooks (`seerlib.capture.pre_rope_hooks`). No modeling code is copied. On exit the model's
previous attention is restored. `sparsify(...).enable()` is the permanent form (`.disable()` undoes
it). Which blocks each layer keeps is the method's business (`seerlib.methods`); `sp.stats` reports
what was kept.

Single-token decode steps (and any call whose query is shorter than its keys, i.e. a cached
continuation) stay dense, and so do sliding-window layers: they keep the model's own attention and
its window (which layers, by family: `seerlib.families`). Attention logit soft-capping (Gemma2's
`softcap`, passed by the model to its attention function) is carried into the sparse path: the
selection's ground truth and the block-sparse product are of the soft-capped logits. The
block-sparse product goes through
`seerlib.ops` (Triton on CUDA, the exact reference on CPU) or, with `attention="flex"`, through
FlexAttention with the selection's `BlockMask` (`seerlib.flex`), compiled: on CPU this is the fast
path (it skips dropped tiles; the reference computes every score).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from torch import nn

from seerlib import ops
from seerlib.capture import attention_layers, attention_override, pre_rope_hooks
from seerlib.families import family_of
from seerlib.flex import flex_sparse_attention
from seerlib.gate import GateSet
from seerlib.graphs import StepGraphs
from seerlib.io import config_hash
from seerlib.methods import (
    LayerInputs,
    SparseConfig,
    check_gate_inputs,
    compiled_gate_block_mask,
    compiled_gate_logits,
    compiled_gate_scores,
    compiled_layer_block_mask,
    gate_block_mask,
    gate_logits,
    gate_scores,
    layer_block_mask,
    pooled_features,
    resolve_config,
)
from seerlib.reference import causal_block_count, num_blocks
from seerlib.select import Selection

__all__ = ["Sparsified", "SparsityStats", "active_handle", "count_blocks", "graphed_gate_step",
           "sparsify"]


class SparsityStats:
    """What the sparse prefills kept, summed over layers and calls since the last `reset()`.

    The kept counts stay on the device while the model runs (reading one is the only host sync
    they cost), so a prefill never waits for them.

    Attributes:
        kept_blocks: kept causal (query block, key block) tiles, over batch and heads.
        causal_blocks: causal tiles there were.
        per_layer: {layer: [kept, causal]}.
        prefill_calls: attention calls that ran sparse (or counted, in "dense" mode).
        dense_calls: calls that stayed dense (decode steps, cached continuations).
    """

    def __init__(self):
        self._kept: dict[int, list] = {}  # layer -> kept counts (device scalars or ints)
        self._causal: dict[int, int] = {}
        self.prefill_calls = 0
        self.dense_calls = 0

    def __repr__(self) -> str:
        return f"SparsityStats({self.as_dict()})"

    @property
    def per_layer(self) -> dict[int, list[int]]:
        return {layer: [int(sum(int(x) for x in kept)), self._causal[layer]]
                for layer, kept in self._kept.items()}

    @property
    def kept_blocks(self) -> int:
        return sum(kept for kept, _ in self.per_layer.values())

    @property
    def causal_blocks(self) -> int:
        return sum(self._causal.values())

    @property
    def achieved_density(self) -> float:
        """Kept share of the causal tiles over every sparse prefill (nan before any)."""
        causal = self.causal_blocks
        return self.kept_blocks / causal if causal else float("nan")

    def layer_density(self, layer: int) -> float:
        kept, causal = self.per_layer[layer]
        return kept / causal

    def add(self, layer: int, mask: torch.Tensor | None, kept: torch.Tensor | None = None,
            shape: tuple[int, ...] | None = None) -> None:
        """Count a (B, H, nb, nb) selection of `layer` (without waiting for the device), or, with
        `kept` (its kept causal tiles, a 0-d tensor) and `shape`, one counted already."""
        B, H, nb, _ = mask.shape if shape is None else shape
        self._kept.setdefault(layer, []).append(mask.tril().sum() if kept is None else kept)
        self._causal[layer] = self._causal.get(layer, 0) + B * H * causal_block_count(nb)
        self.prefill_calls += 1

    def reset(self) -> None:
        self._kept.clear()
        self._causal.clear()
        self.prefill_calls = self.dense_calls = 0

    def as_dict(self) -> dict:
        return {
            "achieved_density": self.achieved_density,
            "kept_blocks": self.kept_blocks,
            "causal_blocks": self.causal_blocks,
            "prefill_calls": self.prefill_calls,
            "dense_calls": self.dense_calls,
        }


# ---------------------------------------------------------------- the model switch


def _check_gates(gates, model, block_size: int) -> None:
    if not isinstance(gates, GateSet):
        raise ValueError(
            f"method 'gate' needs a seerlib GateSet (see seerlib.io.load_gates); got "
            f"{type(gates).__name__}"
        )
    layers = attention_layers(model)
    cfg = model.config
    have, want = config_hash(gates.config), config_hash(cfg)
    if have != want:
        raise ValueError(
            f"these gates were built for model {gates.model_name!r} (config hash {have}); this "
            f"model {getattr(cfg, '_name_or_path', '') or type(model).__name__!r} hashes to {want}"
        )
    if len(gates) != len(layers):
        raise ValueError(f"the gate set has {len(gates)} layers; the model has {len(layers)}")
    if gates.block_size != block_size:
        raise ValueError(
            f"the gates work at block size {gates.block_size}; sparsify was given {block_size}"
        )


_ACTIVE = "_seerlib_sparsified"  # the model's attribute naming its enabled handle


def active_handle(model: nn.Module) -> Sparsified | None:
    """The `sparsify` handle enabled on `model`, or None."""
    return getattr(model, _ACTIVE, None)


class Sparsified:
    """A model switched (or switchable) to block-sparse prefill. Made by `sparsify`.

    Use as a context manager (`with sparsify(...) as sp:`) or permanently (`sp.enable()`, later
    `sp.disable()`). `sp.stats` is a SparsityStats; `sp.masks` holds the last prefill's selection
    per layer when `record_masks=True`.
    """

    def __init__(self, model: nn.Module, cfg: SparseConfig, gates=None, weights=None,
                 record_masks: bool = False, cuda_graphs: bool = False,
                 compile_selection: bool = False):
        self.model, self.config, self.gates = model, cfg, gates
        self.compile_selection = compile_selection
        self.weights = weights
        self.record_masks = record_masks
        self.graphs = StepGraphs() if cuda_graphs else None
        self.masks: dict[int, torch.Tensor] = {}
        self.stats = SparsityStats()
        self._stack: contextlib.ExitStack | None = None
        self._pre: dict = {}
        self.family = family_of(model)

    @property
    def enabled(self) -> bool:
        return self._stack is not None

    def enable(self) -> Sparsified:
        """Switch the model's attention to ours until `disable()`; returns self."""
        if self._stack is not None:
            raise RuntimeError("this sparsify handle is already enabled")
        other = getattr(self.model, _ACTIVE, None)
        if other is not None:
            # two handles would each restore the other's attention on exit and leave the model
            # silently dense (or broken): one at a time
            raise RuntimeError(f"this model already runs another sparsify handle ({other!r}); "
                               "disable it first")
        stack = contextlib.ExitStack()
        try:
            if self.config.spec.needs_gate:
                # no hooks on the layers that never run sparse (sliding layers by layer_types)
                gated = [i for i in range(len(self.gates))
                         if not self.family.keeps_own_attention(self.model.config, i, 0)]
                stack.enter_context(pre_rope_hooks(self.model, self._pre, gated))
            stack.enter_context(attention_override(self.model, self._attend))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        setattr(self.model, _ACTIVE, self)
        return self

    def disable(self) -> None:
        """Restore the model's previous attention (a no-op when not enabled)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
            if getattr(self.model, _ACTIVE, None) is self:
                delattr(self.model, _ACTIVE)
        self._pre.clear()
        if self.graphs is not None:
            self.graphs.clear()  # the captured graphs' memory goes back with them

    def __enter__(self) -> Sparsified:
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        dens = self.stats.achieved_density
        return f"Sparsified({self.config.label}, {state}, density={dens:.3f})"

    def _attend(self, module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        pre = self._pre.pop(layer, None)
        B, Hq, Sq, d = query.shape
        Sk = key.shape[2]
        if Sq != Sk or Sq == 1:
            self.stats.dense_calls += 1
            return default(module, query, key, value, attention_mask, **kwargs)
        window = self.family.layer_window(self.model.config, layer)
        _check_no_padding(attention_mask, Sq, window=window)
        if self.family.keeps_own_attention(self.model.config, layer, Sk):
            self.stats.dense_calls += 1  # a sliding layer: the model's attention, its window
            return default(module, query, key, value, attention_mask, **kwargs)
        cfg = self.config
        softcap = kwargs.get("softcap")  # Gemma2's attn_logit_softcapping, None elsewhere
        scale = kwargs.get("scaling")
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        gate = self.gates[layer] if self.gates is not None else None
        weights = self.weights.get(layer) if self.weights is not None else None
        q_pre, k_pre = (pre["q_pre"], pre["k_pre"]) if pre else (None, None)
        if self.graphs is not None and query.is_cuda and cfg.spec.sparse and cfg.attention == "ops":
            if (cfg.method == "gate" and weights is None and ops.kernel_path(query, cfg.block_size)
                    and not _wants_grad(query, key, value)):
                return self._graphed_gate(layer, query, key, value, q_pre, k_pre, gate, scale,
                                          softcap), None
            out = self._graphed(layer, query, key, value, q_pre, k_pre, weights, gate, scale,
                                softcap)
            return out.transpose(1, 2).contiguous(), None  # (B, S, Hq, d), a copy of the buffer
        if (cfg.method == "gate" and cfg.attention == "ops" and weights is None
                and not self.record_masks and ops.kernel_path(query, cfg.block_size)
                and not _wants_grad(query, key, value)
                and (not self.compile_selection or ops.select_index_fused(cfg.selection))):
            return self._gate_index(layer, query, key, value, q_pre, k_pre, gate, scale,
                                    softcap), None
        layer_in = LayerInputs(query, key, value, cfg.block_size, scale=scale, gate=gate,
                               q_pre=q_pre, k_pre=k_pre, weights=weights, softcap=softcap)
        mask = self._block_mask(cfg, layer_in)
        self.stats.add(layer, mask)
        if self.record_masks:
            self.masks[layer] = mask
        if not cfg.spec.sparse:
            return default(module, query, key, value, attention_mask, **kwargs)
        if cfg.attention == "flex":
            out = flex_sparse_attention(query, key, value, mask, cfg.block_size,
                                        scale=layer_in.scale, compiled=cfg.compile_flex,
                                        softcap=softcap)
        else:
            out = ops.block_sparse_attention(
                query, key, value, mask, cfg.block_size, scale=layer_in.scale, sync_free=True,
                softcap=softcap, out=_transposed_out(query, key, value))
        # (B, Hq, S, d) -> (B, S, Hq, d), like transformers; a no-op copy when the kernel wrote
        # into _transposed_out's buffer
        return out.transpose(1, 2).contiguous(), None

    def _block_mask(self, cfg: SparseConfig, layer_in: LayerInputs) -> torch.Tensor:
        if self.compile_selection:
            return compiled_layer_block_mask()(cfg, layer_in)
        return layer_block_mask(cfg, layer_in)

    def _gate_index(self, layer, query, key, value, q_pre, k_pre, gate, scale, softcap):
        """The "gate" layer on the kernel path with no (nb, nb) mask: the pooled features, the
        logits, then top-k per row and the sync-free block index in one launch where the
        selection allows it (`ops.select_index`), and the kernel writing a (B, S, Hq, d)
        buffer. No host sync, so a whole forward of it can be one graph (`PrefillGraph`).
        Under `compile_selection` (a top-k selection only) the pooling and logits are compiled."""
        check_gate_inputs(gate, q_pre, k_pre)
        B, Hq, S, _ = query.shape
        b = self.config.block_size
        scores = compiled_gate_scores() if self.compile_selection else gate_scores
        logits = scores(gate, q_pre, k_pre)
        index = ops.select_index(logits, self.config.selection, S, b)
        nb = num_blocks(S, b)
        self.stats.add(layer, None, kept=index.counts.sum(), shape=(B, Hq, nb, nb))
        return _attend_index(query, key, value, index, b, scale, softcap)

    def _graphed_gate(self, layer, query, key, value, q_pre, k_pre, gate, scale, softcap):
        """`graphed_gate_step` for this layer, its kept count and mask recorded."""
        check_gate_inputs(gate, q_pre, k_pre)
        out, kept, mask = graphed_gate_step(
            self.graphs, layer, gate, self.config.selection, query, key, value, q_pre, k_pre,
            self.config.block_size, scale=scale, softcap=softcap,
            compiled=self.compile_selection, keep_mask=self.record_masks)
        # the graph's count and mask are overwritten by its next replay: keep copies
        B, Hq, S, _ = query.shape
        nb = num_blocks(S, self.config.block_size)
        self.stats.add(layer, None, kept=kept.clone(), shape=(B, Hq, nb, nb))
        if mask is not None:
            self.masks[layer] = mask.clone()
        return out

    def _graphed(self, layer, query, key, value, q_pre, k_pre, weights, gate, scale, softcap):
        """The layer's selection and sparse attention as one CUDA graph (`seerlib.graphs`)."""
        cfg, b = self.config, self.config.block_size
        named = {"q_pre": q_pre, "k_pre": k_pre, "weights": weights}
        extra = [n for n, t in named.items() if t is not None]

        def step(q, k, v, *rest):
            *given, out = rest
            layer_in = LayerInputs(q, k, v, b, scale=scale, gate=gate, softcap=softcap,
                                   **dict(zip(extra, given, strict=True)))
            mask = self._block_mask(cfg, layer_in)
            ops.block_sparse_attention(q, k, v, mask, b, scale=scale, sync_free=True, out=out,
                                       softcap=softcap)
            # the mask stays in the graph's memory only when it is recorded
            return (mask if self.record_masks else None), mask.tril().sum()

        out, (mask, kept) = self.graphs.run(
            (layer, scale, softcap, tuple(extra)), step,
            [query, key, value, *(named[n] for n in extra)], out_like=query)
        B, Hq, S, _ = query.shape
        nb = num_blocks(S, b)
        # the graph's count and mask are overwritten by its next replay: keep copies
        self.stats.add(layer, None, kept=kept.clone(), shape=(B, Hq, nb, nb))
        if mask is not None:
            self.masks[layer] = mask.clone()
        return out


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _transposed_out(query, key, value):
    """A (B, Hq, S, d) view of a new (B, S, Hq, d) buffer for the kernel to write into, so the
    layer's output needs no transposing copy; None off the kernel path (CPU, or autograd on)."""
    if not query.is_cuda or _wants_grad(query, key, value):
        return None
    return _bshd_buffer(query).transpose(1, 2)


def _bshd_buffer(query):
    """A new (B, S, Hq, d) buffer (transformers' attention output) for query (B, Hq, S, d)."""
    B, Hq, S, d = query.shape
    return torch.empty(B, S, Hq, d, dtype=query.dtype, device=query.device)


def graphed_gate_step(graphs: StepGraphs, layer, gate, selection, query, key, value, q_pre,
                      k_pre, block_size: int, *, scale: float, softcap=None,
                      compiled: bool = False, keep_mask: bool = False):
    """One layer's "gate" step on CUDA with no copy of the layer's tensors: `ops.pool_blocks`
    writes the pooled q_pre / k_pre straight into `graphs`' static inputs, the CUDA graph of
    (layer, "gate", S) replays the gate's logits, the selection and the sync-free block index
    (top-k per row: one launch, `ops.select_index`; else `select_blocks`, through torch.compile
    when `compiled`, and `ops.block_index`), and the kernel then runs outside the graph on the
    layer's own q, k, v, writing a (B, S, Hq, d) buffer directly.

    Args:
        query: (B, Hq, S, d); key, value: (B, Hkv, S, d); q_pre, k_pre: their pre-RoPE forms;
            on the kernel path (`ops.kernel_path`).
    Returns:
        (out (B, S, Hq, d), kept causal tiles (0-d tensor), mask (B, Hq, nb, nb) or None unless
        keep_mask): the count and mask live in the graph's memory, overwritten by its next replay.
    """
    B, Hq, S, d = query.shape
    nb, dev = num_blocks(S, block_size), query.device
    qp, kp = graphs.statics([
        ((B, Hq, nb, len(gate.q_pool) * d), torch.float32, dev),
        ((B, key.shape[1], nb, len(gate.k_pool) * d), torch.float32, dev)])
    pooled_features(gate, q_pre, k_pre, out=(qp, kp))
    build = compiled_gate_block_mask() if compiled else gate_block_mask
    logits_of = compiled_gate_logits() if compiled else gate_logits
    fused = not keep_mask and ops.select_index_fused(selection)

    def step(qp, kp):
        if fused:  # the logits, then the selection and index in one launch
            index = ops.select_index(logits_of(gate, qp, kp), selection, S, block_size)
            return index, None, index.counts.sum()
        mask = build(gate, qp, kp, selection)
        index = ops.block_index(mask, S, block_size)
        # the mask stays in the graph's memory only when it is kept
        return index, (mask if keep_mask else None), mask.tril().sum()

    index, mask, kept = graphs.replay((layer, "gate", S), step, [qp, kp])
    return _attend_index(query, key, value, index, block_size, scale, softcap), kept, mask


def _attend_index(query, key, value, index, block_size: int, scale: float, softcap):
    """The kernel on a prepared block index, writing a new (B, S, Hq, d) buffer directly
    (transformers' layout) for query (B, Hq, S, d), key, value (B, Hkv, S, d)."""
    out = _bshd_buffer(query)
    ops.block_sparse_attention(query, key, value, index, block_size, scale=scale,
                               softcap=softcap, out=out.transpose(1, 2))
    return out


def count_blocks(mask: torch.Tensor) -> tuple[int, int]:
    """(kept causal tiles, all causal tiles) of a (B, H, nb, nb) block mask."""
    B, H, nb, _ = mask.shape
    return int(mask.tril().sum()), B * H * causal_block_count(nb)


def _check_no_padding(attention_mask, S: int, rows: int = 1024,
                      window: int | None = None) -> None:
    """Sparse prefill assumes plain causal attention: refuse padding masks. A layer with a sliding
    `window` may get the model's sliding-window causal mask (key j seen by queries j .. j+window-1),
    which is no padding. (transformers passes None for a plain causal prefill; a given mask is
    compared in slices of `rows` query rows, so the check allocates no S x S tensor of its own.)"""
    if attention_mask is None:
        return
    m = attention_mask[..., -S:, -S:]
    col = torch.arange(S, device=m.device)
    ok = torch.ones((), dtype=torch.bool, device=m.device)
    for r0 in range(0, S, rows):
        part = m[..., r0:r0 + rows, :]
        allowed = part if part.dtype == torch.bool else part == 0  # additive masks: 0 = allowed
        row = torch.arange(r0, r0 + part.shape[-2], device=m.device)[:, None]
        causal = col[None, :] <= row
        if window is not None:
            causal &= col[None, :] > row - window
        ok &= (allowed == causal).all()
    if not bool(ok):
        raise NotImplementedError(
            "sparse prefill takes plain causal attention only; got an attention mask with padding "
            "or other masked positions (run batches of equal-length, unpadded sequences)"
        )


def sparsify(
    model: nn.Module,
    config,
    *,
    selection: Selection | None = None,
    gates=None,
    block_size: int | None = None,
    attention: str | None = None,
    compile_flex: bool | None = None,
    oracle_weights: dict[int, torch.Tensor] | None = None,
    record_masks: bool = False,
    cuda_graphs: bool = False,
    compile_selection: bool = False,
) -> Sparsified:
    """Make a transformers model run block-sparse prefill.

    Args:
        model: the transformers causal LM, of a family `seerlib.families` knows (Llama, Mistral,
            Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text, Phi-3).
        config: a `SparseConfig`, a preset name ("recommended"), a label ("gate+sink@0.3",
            "sink_window@0.2", "dense"), or a method name ("gate", "oracle-max", ...) with
            `selection`. A density of 1.0 keeps everything and reproduces dense logits.
        selection: the `Selection` for a method name given as `config`.
        gates: a `GateSet` for this model (methods that need a gate), e.g.
            `seerlib.io.load_gates(path, model)`.
        block_size: tile size b; default the gates' block size for gate methods, else the
            config's (64 unless it says otherwise).
        attention: "ops" (seerlib.ops dispatch point) or "flex" (FlexAttention BlockMask);
            default the config's ("ops").
        compile_flex: compile FlexAttention (leave on except for tiny tests); default the config's.
        oracle_weights: {layer: (B, Hq, nb, nb)} ground-truth maps to select from instead of
            computing them inside each layer (e.g. from a dense pass over the same tokens).
        record_masks: keep the last prefill's block mask of each layer in `.masks`.
        cuda_graphs: on CUDA with attention "ops", run each layer's selection and sparse attention
            as a CUDA graph, captured on a layer's first prefill of a shape and replayed after
            (`seerlib.graphs`): short prefills are bound by launch cost, which this removes.
            Inputs are copied into static buffers shared by the layers. To take the rest of the
            host's per-layer work away too, leave this off and capture the whole forward of a
            fixed shape instead (`seerlib.prefill_graph.PrefillGraph`).
        compile_selection: run each layer's gate and selection through `torch.compile`
            (`seerlib.methods.compiled_layer_block_mask`): the same masks from a few fused kernels
            instead of some 50 small launches; the first prefill of each shape compiles (seconds).
            Combines with `cuda_graphs` (compiled before the capture, in its warm-up). A gate
            layer on the kernel path with a top-k selection compiles only its pooling and logits
            (`seerlib.methods.compiled_gate_scores`; graphed: `compiled_gate_logits`): the top-k
            and index stay one launch (`ops.select_index`), and the layer stays capturable by
            `PrefillGraph`.
    Returns:
        A `Sparsified` handle: a context manager, or `.enable()` for the permanent form.
    Raises:
        ValueError: an unknown method, preset or label, a selection the method does not honour,
            gates missing or made for another model or block size, a model family seerlib has
            no adapter for.
    """
    if selection is not None:
        if not isinstance(config, str) or "+" in config or "@" in config:
            raise ValueError(f"selection= goes with a method name such as 'gate'; got {config!r}")
        config = SparseConfig(config, selection)
    cfg = resolve_config(config)
    if block_size is None and cfg.spec.needs_gate and gates is not None:
        block_size = getattr(gates, "block_size", None)
    changes = {k: v for k, v in dict(block_size=block_size, attention=attention,
                                     compile_flex=compile_flex).items() if v is not None}
    cfg = replace(cfg, **changes) if changes else cfg
    if cfg.spec.needs_gate:
        if gates is None:
            raise ValueError(f"method {cfg.method!r} needs gates=GateSet (see "
                             "seerlib.io.load_gates)")
        _check_gates(gates, model, cfg.block_size)
    elif gates is not None:
        raise ValueError(f"gates are only used by methods that read a gate; got method "
                         f"{cfg.method!r} with gates")
    if oracle_weights is not None and cfg.spec.ground_truth is None:
        raise ValueError(f"oracle_weights are only used by the oracle methods; got method "
                         f"{cfg.method!r}")
    attention_layers(model)  # fails early on a model without attention layers
    return Sparsified(model, cfg, gates=gates, weights=oracle_weights, record_masks=record_masks,
                      cuda_graphs=cuda_graphs, compile_selection=compile_selection)
