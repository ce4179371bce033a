"""Context extension by YaRN: a model's rope settings scaled by a factor, its rotary rebuilt.

YaRN (Peng et al., 2023) stretches a RoPE model's context by `factor` without new weights: the
rotary frequencies whose wavelength fits many times in the original context are kept, the slow
ones are divided by `factor` (position interpolation), the ones between are blended on a ramp
(`beta_fast` 32 / `beta_slow` 1 rotations), and cos / sin are multiplied by an attention factor
0.1 ln(factor) + 1 (on q and k both, so the logits by its square). transformers computes all of
that from the config (`rope_parameters` with rope_type "yarn"); this module writes those settings
and rebuilds the rotary embeddings of a model already loaded, so the model, a model built anew
from its config, and the gates' `BlockRoPE` (built from the same config) all rotate alike.

- `yarn_rope_parameters(config, factor)`: the YaRN settings for a config (it is not changed).
- `extend_context(model_or_config, factor)`: writes them, and `max_position_embeddings` =
  original context x factor, into the config in place; a model's rotary buffers (inv_freq and the
  attention scaling) are rebuilt from it.
- `rebuild_rotary(model)`: every rotary embedding rebuilt from its config, buffers in float32.
- `load_extended(context=32768, ...)`: `seerlib.data.load_model` extended to `context` tokens.

Build gates (`GateSet`, `DecodeGateSet`) after extending: a gate set copies the rope settings
when it is built. Gate files record a hash of the config, rope settings included, so a gate file
made for the base model is refused by `load_gates` on the extended one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["extend_context", "load_extended", "original_context", "rebuild_rotary",
           "yarn_rope_parameters"]

# rope types extend_context starts from: plain RoPE, or YaRN already at the asked factor (a no-op)
_UNSCALED = "default"
_YARN = "yarn"


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def _rope_of(config) -> dict:
    """The config's one set of rope settings, checked to be there and not per layer type."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not rope:
        raise ValueError(
            f"config of type {type(config).__name__} has no rope settings (rope_parameters is "
            f"{rope!r}); YaRN extends a model with rotary position embeddings")
    if all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(
            f"config of type {type(config).__name__} keeps one set of rope settings per layer type "
            f"({sorted(rope)}); extend_context handles a single set")
    if "rope_type" not in rope or "rope_theta" not in rope:
        raise ValueError(f"rope_parameters {rope} lack rope_type or rope_theta; expected the "
                         "standardized settings of transformers >= 5")
    return rope


def original_context(config) -> int:
    """The context the model was trained for: YaRN's `original_max_position_embeddings` when the
    config is extended already, else `max_position_embeddings`."""
    rope = _rope_of(config)
    if rope["rope_type"] == _YARN:
        return int(rope["original_max_position_embeddings"])
    ctx = getattr(config, "max_position_embeddings", None)
    if not isinstance(ctx, int) or ctx <= 0:
        raise ValueError(f"config of type {type(config).__name__} has max_position_embeddings "
                         f"{ctx!r}; expected the model's context, a positive int")
    # a config that keeps the trained length outside the rope settings (Phi-3) is ambiguous
    other = getattr(config, "original_max_position_embeddings", None)
    if other is not None and other != ctx:
        raise ValueError(f"config has original_max_position_embeddings {other} beside "
                         f"max_position_embeddings {ctx}; expected one context to extend")
    return ctx


def _check_factor(factor) -> float:
    if (isinstance(factor, bool) or not isinstance(factor, (int, float))
            or not math.isfinite(factor)):
        raise ValueError(f"factor must be a finite number > 1; got {factor!r}")
    if factor <= 1:
        raise ValueError(f"factor must be > 1 (the new context over the original); got {factor}")
    return float(factor)


def yarn_rope_parameters(config, factor: float) -> dict:
    """The rope settings of `config` extended by YaRN to `factor` x its original context.

    Args:
        config: a transformers config with one set of rope settings, plain RoPE ("default") or
            YaRN at this same factor.
        factor: the new context over the original, > 1; original x factor must be whole tokens.
    Returns:
        rope_parameters: the config's (rope_theta, partial_rotary_factor, ...) with rope_type
        "yarn", factor and original_max_position_embeddings. The config is not changed.
    Raises:
        ValueError: no rope settings, per-layer-type settings, a rope scaled another way (linear,
            dynamic, llama3, longrope, or YaRN at another factor), factor <= 1, or a context that
            is not a whole number of tokens.
    """
    factor = _check_factor(factor)
    rope = _rope_of(config)
    kind = rope["rope_type"]
    if kind == _YARN and float(rope.get("factor", 0)) != factor:
        raise ValueError(
            f"config is extended by YaRN x{rope.get('factor')} from "
            f"{rope.get('original_max_position_embeddings')} tokens already; asked x{factor}. "
            "Extend the base config (the factor counts from the original context)")
    if kind not in (_UNSCALED, _YARN):
        raise ValueError(f"config's rope is scaled by {kind!r} already ({rope}); YaRN starts from "
                         f"plain RoPE (rope_type {_UNSCALED!r})")
    orig = original_context(config)
    if orig * factor != round(orig * factor):
        raise ValueError(f"factor {factor} gives {orig * factor} tokens from {orig}; expected a "
                         "whole number of tokens (load_extended(context=N) picks the factor)")
    return {**rope, "rope_type": _YARN, "factor": factor, "original_max_position_embeddings": orig}


def extend_context(model_or_config, factor: float) -> dict:
    """Extend a model (or config) by YaRN to `factor` x its original context, in place.

    The config's `rope_parameters` become `yarn_rope_parameters(config, factor)` and its
    `max_position_embeddings` the new context; a model's rotary embeddings are rebuilt from it
    (`rebuild_rotary`: inv_freq and attention scaling, float32, on the device they were on), so a
    model already loaded rotates as one built from the extended config. Weights are untouched.

    Returns:
        The new rope_parameters.
    Raises:
        ValueError: see `yarn_rope_parameters`.
    """
    config = _config_of(model_or_config)
    rope = yarn_rope_parameters(config, factor)
    before = config.rope_parameters, config.max_position_embeddings
    config.rope_parameters = rope
    config.max_position_embeddings = round(rope["original_max_position_embeddings"] * factor)
    try:
        if hasattr(config, "validate_rope"):  # transformers' own check of the new settings
            config.validate_rope()
    except Exception:
        config.rope_parameters, config.max_position_embeddings = before  # a refusal changes nothing
        raise
    if isinstance(model_or_config, nn.Module):
        rebuild_rotary(model_or_config)
    return rope


def _is_rotary(module: nn.Module) -> bool:
    # transformers' rotary classes: LlamaRotaryEmbedding, Qwen3RotaryEmbedding, ...
    return type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config")


def rebuild_rotary(model: nn.Module) -> int:
    """Replace every rotary embedding of `model` by a new one built from its config.

    The new module's buffers (inv_freq, original_inv_freq) are float32 whatever the model's dtype
    (`model.to(bfloat16)` casts them: bf16 keeps 8 significant bits, so the angle at position p
    can be off by p / 256 rad) and sit on the device the old ones were on; its attention scaling
    is the config's.

    Returns:
        How many rotary embeddings were rebuilt.
    Raises:
        ValueError: the model has none.
    """
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_rotary(child):
                continue
            buf = next(child.buffers(), None)
            device = buf.device if buf is not None else torch.device("cpu")
            with torch.device("cpu"):
                fresh = type(child)(child.config)
            setattr(parent, name, fresh.to(device=device))
            n += 1
    if not n:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (a class named "
                         "*RotaryEmbedding with a config); expected a transformers RoPE model")
    return n


def load_extended(context: int = 32768, **load_model_kwargs):
    """`seerlib.data.load_model(**load_model_kwargs)` extended by YaRN to `context` tokens.

    Args:
        context: the new context in tokens, above the model's original (8192 for SmolLM2); the
            factor is context / original.
        load_model_kwargs: dtype, device, attn_implementation (see `load_model`).
    Returns:
        (model, tokenizer), the model's config with YaRN rope settings and its rotary buffers in
        float32.
    """
    # Lazy: seerlib.data pulls in the cache checks; extend_context on a config needs none of it.
    from seerlib.data import load_model

    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens; got {context!r}")
    model, tok = load_model(**load_model_kwargs)
    orig = original_context(model.config)
    if context <= orig:
        raise ValueError(f"context {context} is not above the model's original {orig} tokens; "
                         "seerlib.load_model gives the model as it is")
    extend_context(model, context / orig)
    return model, tok
