"""Model-family adapters: the one place that knows a transformers family's quirks.

Each `Family` says, for the models of its `model_type`s:
- where the attention modules are (`attention_layers`) and how to read the pre-RoPE Q/K and V as
  RoPE receives them (`qkv_hooks`): after `q_norm` / `k_norm` where the family has them (Qwen3,
  Gemma3), split out of a fused `qkv_proj` (Phi-3);
- the head counts and head dim (`heads`), and the rope settings of the layers SeerAttention
  applies to (`rotary_embedding`: Gemma3 keeps one set per layer type, Phi-3 may rotate part of
  the head dim);
- attention logit soft-capping (`softcapping`: Gemma2's `attn_logit_softcapping`). The model
  passes it to its attention function as `softcap`, and seerlib carries that into the sparse path:
  the oracle's ground truth, the distillation targets and the block-sparse product are all of the
  soft-capped logits (`seerlib.reference`: logits -> cap * tanh(logits / cap), then mask, softmax);
- sliding-window layers (`layer_window`): Mistral's `sliding_window` holds on every layer, Gemma2/3
  (and Qwen2/3 with `use_sliding_window`) mark theirs in `layer_types`. SeerAttention applies to
  the global layers; a sliding layer keeps the model's own attention (its window).
The attention scale needs no adapter: every family passes `module.scaling` (Gemma's
`query_pre_attn_scalar`) to the attention function, and the sparse path uses it.

`family_of(model_or_config)` finds the adapter by `config.model_type`; an unknown type is refused
with the list of known ones (`register_family` adds one).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FAMILIES", "Family", "family_of", "register_family"]

# a hook reader: the hooked module's output -> {"q_pre" | "k_pre" | "v": (B, H, S, d)}
Reader = Callable[[torch.Tensor], dict]


def _heads(out: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, S, _ = out.shape
    return out.view(B, S, -1, head_dim).transpose(1, 2)  # (B, S, H*d) -> (B, H, S, d)


@dataclass(frozen=True)
class Family:
    """One model family's adapter.

    Attributes:
        name: the family's name (the README's support table uses it).
        model_types: the `config.model_type`s it covers.
        fused_qkv: one `qkv_proj` whose output is [q | k | v] on channels (Phi-3).
        qk_norm: "bshd" / "bhsd": `q_norm` / `k_norm` follow the projections, applied to
            (B, S, H, d) (Qwen3) or to (B, H, S, d) (Gemma3); None: RoPE reads the projections.
        window: where sliding windows live: "layer_types" (layers marked "sliding_attention" use
            `config.sliding_window`), "config" (every layer uses `config.sliding_window`), or None.
        softcap: the config may set `attn_logit_softcapping`.
        rope_key: the key of the global layers' settings when `rope_parameters` holds one set per
            layer type (Gemma3: "full_attention").
        rotary: "module:Class" of the family's rotary embedding (the gate's block RoPE uses it).
    """

    name: str
    model_types: tuple[str, ...]
    fused_qkv: bool = False
    qk_norm: str | None = None
    window: str | None = None
    softcap: bool = False
    rope_key: str | None = None
    rotary: str = "transformers.models.llama.modeling_llama:LlamaRotaryEmbedding"

    # ------------------------------------------------------------ config

    def heads(self, config) -> tuple[int, int, int, int]:
        """(num_layers, Hq, Hkv, head_dim) of a config of this family."""
        Hq = config.num_attention_heads
        Hkv = getattr(config, "num_key_value_heads", None) or Hq
        d = getattr(config, "head_dim", None) or config.hidden_size // Hq
        return config.num_hidden_layers, Hq, Hkv, d

    def layer_window(self, config, layer: int) -> int | None:
        """Layer `layer`'s sliding window in tokens (a key is seen by the next `window` queries,
        itself included), or None for a global (full causal) layer."""
        w = getattr(config, "sliding_window", None)
        if self.window is None or w is None:
            return None
        if self.window == "config":
            return int(w)
        types = getattr(config, "layer_types", None) or ()
        return int(w) if layer < len(types) and types[layer] == "sliding_attention" else None

    def keeps_own_attention(self, config, layer: int, num_keys: int) -> bool:
        """Whether layer `layer` runs the model's own attention over `num_keys` keys instead of
        SeerAttention: a layer marked "sliding_attention" always does (SeerAttention applies to
        the global layers, whose gates are the ones distilled); a window set on every layer
        (Mistral, Phi-3) only where it binds, past `window` keys (a shorter prefill is plain
        causal attention)."""
        w = self.layer_window(config, layer)
        if w is None:
            return False
        return self.window == "layer_types" or num_keys > w

    def softcapping(self, config) -> float | None:
        """The attention logit soft-cap (scores -> cap * tanh(scores / cap)), or None."""
        return getattr(config, "attn_logit_softcapping", None) if self.softcap else None

    def rotary_embedding(self, config, dim: int) -> nn.Module:
        """The family's rotary embedding for the global layers' rope settings, at head dim `dim`
        (`forward(x, position_ids) -> (cos, sin)`, as the model's own)."""
        cfg = copy.deepcopy(config)
        rope = getattr(cfg, "rope_parameters", None)
        if rope is None:
            raise ValueError(f"config of type {type(config).__name__} has no rope_parameters; a "
                             "gate needs the model's rope settings")
        if self.rope_key is not None and self.rope_key in rope:
            cfg.rope_parameters = dict(rope[self.rope_key])  # one set per layer type: the globals'
        elif "rope_type" not in rope:
            raise ValueError(f"{self.name}: rope_parameters hold no rope_type (keys "
                             f"{sorted(rope)}); expected one set of rope settings")
        cfg.head_dim = dim
        path, cls = self.rotary.split(":")
        # Lazy: transformers takes seconds to import; `import seerlib` should not pay for it.
        return getattr(importlib.import_module(path), cls)(cfg)

    # ------------------------------------------------------------ modules

    def _projections(self) -> tuple[str, ...]:
        return ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")

    def attention_layers(self, model: nn.Module) -> list[nn.Module]:
        """The attention modules (with the family's projections and a layer_idx), in layer order."""
        need = (*self._projections(), "layer_idx", *(("q_norm", "k_norm") if self.qk_norm else ()))
        layers = [m for m in model.modules() if all(hasattr(m, a) for a in need)]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no attention modules with "
                             f"{'/'.join(need)}; expected a transformers {self.name} model")
        return sorted(layers, key=lambda m: m.layer_idx)

    def qkv_hooks(self, attn: nn.Module) -> list[tuple[nn.Module, Reader]]:
        """Where layer `attn`'s pre-RoPE Q, K and V appear: (module, reader) pairs, a reader
        mapping the module's forward output to {"q_pre", "k_pre", "v": (B, H, S, d)}."""
        d = attn.head_dim
        if self.fused_qkv:
            cfg = attn.config
            nq, nk = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

            def split(out):  # (B, S, (Hq + 2 Hkv) d) -> q, k, v on channels
                q, k, v = out.split([nq, nk, out.shape[-1] - nq - nk], dim=-1)
                return {"q_pre": _heads(q, d), "k_pre": _heads(k, d), "v": _heads(v, d)}

            return [(attn.qkv_proj, split)]
        v = (attn.v_proj, lambda out: {"v": _heads(out, d)})
        if self.qk_norm is None:
            return [(attn.q_proj, lambda out: {"q_pre": _heads(out, d)}),
                    (attn.k_proj, lambda out: {"k_pre": _heads(out, d)}), v]
        # RoPE receives the norms' outputs
        if self.qk_norm == "bshd":
            def lay(out):
                return out.transpose(1, 2)  # (B, S, H, d) -> (B, H, S, d)
        else:
            def lay(out):
                return out  # (B, H, S, d) already
        return [(attn.q_norm, lambda out: {"q_pre": lay(out)}),
                (attn.k_norm, lambda out: {"k_pre": lay(out)}), v]

    def eager_attention(self, model: nn.Module) -> Callable | None:
        """The model's own eager attention function (its module's `eager_attention_forward`), or
        None. It differs from SDPA where the family adds to the softmax (Gemma2's soft-capping)."""
        attn = self.attention_layers(model)[0]
        mod = importlib.import_module(type(attn).__module__)
        return getattr(mod, "eager_attention_forward", None)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) an adapter; its model types then find it."""
    for t in family.model_types:
        FAMILIES[t] = family
    return family


for _f in (
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral",), window="config"),
    Family("Qwen2", ("qwen2",), window="layer_types"),
    Family("Qwen3", ("qwen3",), qk_norm="bshd", window="layer_types"),
    Family("Gemma", ("gemma",)),
    Family("Gemma2", ("gemma2",), window="layer_types", softcap=True),
    Family("Gemma3", ("gemma3_text",), qk_norm="bhsd", window="layer_types", softcap=True,
           rope_key="full_attention"),
    Family("Phi-3", ("phi3",), fused_qkv=True, window="config",
           rotary="transformers.models.phi3.modeling_phi3:Phi3RotaryEmbedding"),
):
    register_family(_f)


def family_of(model_or_config) -> Family:
    """The adapter of a transformers model or config, by its `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        hint = (" (a multimodal Gemma 3: load its text model, Gemma3ForCausalLM)"
                if kind == "gemma3" else "")
        raise ValueError(f"seerlib has no adapter for model type {kind!r}{hint}; it knows "
                         f"{sorted(FAMILIES)} (seerlib.families.register_family adds one)")
    return FAMILIES[kind]
