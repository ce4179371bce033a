"""Per-layer Q, K and V from a transformers model, taken with hooks (no copy of modeling code).

Two mechanisms, both reusable by the integration:
- `pre_rope_hooks`: forward hooks give each attention layer's Q, K and V as RoPE receives them,
  reshaped to (B, H, S, d); the model family's adapter (`seerlib.families`) says where: q_proj /
  k_proj / v_proj, the q_norm / k_norm that follow them (Qwen3, Gemma3), or a fused qkv_proj split
  in three (Phi-3).
- `attention_override`: routes every attention layer through a function of ours, registered in
  transformers' AttentionInterface; it sees the post-RoPE Q and K and the un-repeated K/V heads.
`AttentionSwitch` is the handle that holds both while enabled (the decode handles build on it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from seerlib.families import family_of

__all__ = ["AttentionSwitch", "LayerQKV", "attention_layers", "pre_rope_hooks",
           "attention_override", "capture_qkv"]

_names = itertools.count()


@dataclass
class LayerQKV:
    """One layer's projections, each (B, H, S, d); k and v have the kv head count. `scale` and
    `softcap` are what the model passes its attention function (`scaling`, Gemma's
    `query_pre_attn_scalar`; `softcap`, Gemma2's logit soft-cap), None when it passes none: the
    maps of this layer's attention take both."""

    q_pre: torch.Tensor
    k_pre: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None = None
    softcap: float | None = None


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of `model`, in layer order, as its family's adapter finds them."""
    return family_of(model).attention_layers(model)


@contextmanager
def pre_rope_hooks(model: nn.Module, store: dict, layers: Iterable[int] | None = None):
    """While active, every forward writes store[layer_idx] = {"q_pre", "k_pre", "v"}, (B, H, S, d).

    Tensors are stored as produced (not detached), so a caller may backpropagate through them.
    """
    wanted = None if layers is None else set(layers)
    family = family_of(model)
    handles = []
    for attn in family.attention_layers(model):
        if wanted is not None and attn.layer_idx not in wanted:
            continue
        for source, read in family.qkv_hooks(attn):

            def hook(mod, args, out, read=read, layer=attn.layer_idx):
                store.setdefault(layer, {}).update(read(out))

            handles.append(source.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _delegate(model: nn.Module, impl: str) -> tuple[Callable, Callable]:
    """(attention function, mask function) of the model's previous implementation `impl`."""
    # Lazy here and below: transformers takes seconds to import, and `import seerlib.capture`
    # (the LayerQKV record, reached through seerlib.metrics) should not pay for it.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        # eager is model-specific (Gemma2 soft-caps its scores there): the model's own, with the
        # additive masks it expects (it takes causality from the mask)
        eager = family_of(model).eager_attention(model)
        if eager is not None:
            return eager, eager_mask
    if impl in ("sdpa", "eager", None):
        return sdpa_attention_forward, sdpa_mask
    return ALL_ATTENTION_FUNCTIONS[impl], sdpa_mask  # our functions take SDPA-style masks


@contextmanager
def attention_override(model: nn.Module, fn: Callable):
    """Route every attention layer of `model` through `fn` while the context is active.

    `fn(module, query, key, value, attention_mask, *, scaling, dropout, default, **kwargs)` gets
    query (B, Hq, S, d) and key/value (B, Hkv, S_kv, d) after RoPE (and after the KV cache update),
    the transformers attention mask (boolean, or additive for an eager model), and `default`, the
    attention function the model used before (call it to compute dense attention). It returns
    (out (B, S, Hq, d), weights or None), like any transformers attention function. The model's
    previous implementation is restored on exit.
    """
    # Lazy, as in _delegate: transformers takes seconds to import.
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = model.config._attn_implementation
    default, mask_fn = _delegate(model, previous)
    name = f"seerlib_{next(_names)}"

    def wrapped(module, query, key, value, attention_mask, **kwargs):
        return fn(module, query, key, value, attention_mask, default=default, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, wrapped)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)  # the masks `default` expects
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for registry in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
            registry._global_mapping.pop(name, None)


@torch.no_grad()
def capture_qkv(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[int, LayerQKV]:
    """Run `model` on `input_ids` and return each requested layer's Q, K, V.

    Args:
        model: a transformers causal LM of a family `seerlib.families` knows.
        input_ids: (B, S) token ids.
        layers: layer indices to keep (all by default).
        attention_mask: optional (B, S) padding mask, passed to the model.
    Returns:
        {layer_idx: LayerQKV} with q_pre, k_pre (before RoPE), q, k (after RoPE) and v, each
        (B, H, S, d), detached, in the model's dtype.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S); got shape {tuple(input_ids.shape)}")
    n_layers = len(attention_layers(model))
    keep = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has layers 0..{n_layers - 1}")
    pre: dict = {}
    post: dict = {}

    def record(module, query, key, value, attention_mask, *, default, **kwargs):
        if module.layer_idx in keep:
            post[module.layer_idx] = (query.detach(), key.detach(), value.detach(),
                                      kwargs.get("scaling"), kwargs.get("softcap"))
        return default(module, query, key, value, attention_mask, **kwargs)

    with pre_rope_hooks(model, pre, keep), attention_override(model, record):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return {
        i: LayerQKV(
            q_pre=pre[i]["q_pre"].detach(),
            k_pre=pre[i]["k_pre"].detach(),
            q=post[i][0],
            k=post[i][1],
            v=post[i][2],
            scale=post[i][3],
            softcap=post[i][4],
        )
        for i in keep
    }


class AttentionSwitch:
    """A handle that routes a model's attention through `self._attend` while enabled (and takes
    the pre-RoPE Q/K into `self._pre` when `_wants_pre_rope()`): a context manager, or
    `enable()` / `disable()`. Subclasses define `_attend` (an `attention_override` function),
    and may extend `_wants_pre_rope` and `_on_disable`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._pre: dict = {}
        self._stack: ExitStack | None = None

    @property
    def enabled(self) -> bool:
        return self._stack is not None

    def _wants_pre_rope(self) -> bool:
        return False

    def _on_disable(self) -> None:
        """Called after the model's attention is restored."""

    def enable(self):
        """Switch the model's attention to `_attend` until `disable()`; returns self."""
        if self._stack is not None:
            raise RuntimeError("this handle is already enabled")
        stack = ExitStack()
        try:
            if self._wants_pre_rope():
                stack.enter_context(pre_rope_hooks(self.model, self._pre))
            stack.enter_context(attention_override(self.model, self._attend))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def disable(self) -> None:
        """Restore the model's previous attention (a no-op when not enabled)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._pre.clear()
        self._on_disable()

    def __enter__(self):
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()
