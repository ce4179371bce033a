"""Tiny random-weight models of every supported family, from transformers' own config classes.

No hub and no download: what the family tests run on, and a way to try seerlib on a family in
seconds. `tiny_family("gemma2", attn_logit_softcapping=1.0)` gives a 3-layer Gemma2 (hidden 64,
4 query / 2 kv heads, head dim 16, vocabulary 101) with the overrides applied; Gemma2/3 are
hybrid (sliding, global, sliding; window 32).
"""

from __future__ import annotations

import importlib

import torch
import transformers

__all__ = ["BASE", "TINY", "WINDOW", "tiny_classes", "tiny_family", "tiny_modeling"]

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=512,
            initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 32  # a sliding window shorter than the tests' 128 tokens: it binds
HYBRID = ["sliding_attention", "full_attention", "sliding_attention"]
_GEMMA = dict(sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=32)
# family -> (config class, model class, transformers.models module, config overrides)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral", {}),  # window 4096: never binds
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gemma", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2", _GEMMA),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3", _GEMMA),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3", {}),
}


def tiny_classes(family: str) -> tuple[type, type]:
    """(config class, model class) of `family`; a LookupError names what is missing."""
    if family not in TINY:
        raise LookupError(f"no tiny model for family {family!r}; known: {sorted(TINY)}")
    cfg_name, model_name = TINY[family][:2]
    if not hasattr(transformers, cfg_name) or not hasattr(transformers, model_name):
        raise LookupError(f"transformers {transformers.__version__} has no {cfg_name}")
    return getattr(transformers, cfg_name), getattr(transformers, model_name)


def tiny_family(family: str, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random `family` model in eval mode with no gradients, seeded by `seed`; `overrides`
    go to its config (over BASE and the family's own)."""
    cfg_cls, model_cls = tiny_classes(family)
    cfg = cfg_cls(**{**BASE, **TINY[family][3], **overrides})
    torch.manual_seed(seed)
    return model_cls(cfg).eval().requires_grad_(False)


def tiny_modeling(family: str):
    """The family's `transformers.models.<name>.modeling_<name>` module (to spy on its RoPE)."""
    name = TINY[family][2]
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
