"""Model-family adapters on tiny random models built from transformers' own config classes (no hub):
the gate reads what RoPE receives, density 1.0 gives the dense logits (Gemma2 with its logit
soft-cap, which the sparse path and the distillation targets carry), a distillation step runs, and
sliding-window layers keep their window."""

import importlib
from types import SimpleNamespace

import pytest
import torch
import transformers

from seerlib import integrate, ops, reference
from seerlib.capture import capture_qkv
from seerlib.distill import DistillConfig, Distiller
from seerlib.families import family_of
from seerlib.gate import BlockRoPE, GateSet
from seerlib.integrate import sparsify
from seerlib.targets import WindowCache, build_cache, capture_features

S, B16, VOCAB = 128, 16, 101
WINDOW = 32  # shorter than S: the window binds
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
            initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HYBRID = ["sliding_attention", "full_attention", "sliding_attention"]
# family -> (config class, model class, module, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral", {}),  # window 4096 > S
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gemma", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2",
               dict(sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=32)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3",
               dict(sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=32)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3", {}),
}


def _classes(name):
    cfg_cls, model_cls, _, _ = FAMILIES[name]
    if not hasattr(transformers, cfg_cls) or not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_cls}")
    return getattr(transformers, cfg_cls), getattr(transformers, model_cls)


def tiny(name, **overrides):
    cfg_cls, model_cls = _classes(name)
    cfg = cfg_cls(**{**BASE, **FAMILIES[name][3], **overrides})
    torch.manual_seed(0)
    return model_cls(cfg).eval().requires_grad_(False)


def ids(n=1, seed=0):
    return torch.randint(3, VOCAB, (n, S), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def n_sliding(model):
    cfg = model.config
    return sum(family_of(cfg).keeps_own_attention(cfg, i, S) for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_gives_what_rope_receives(name, monkeypatch):
    """pre-RoPE Q/K as the model's own rotary application receives them (after q_norm / k_norm,
    split out of a fused qkv_proj), and post-RoPE Q/K as it returns them."""
    model = tiny(name)
    modeling = importlib.import_module(f"transformers.models.{FAMILIES[name][2]}.modeling_"
                                       f"{FAMILIES[name][2]}")
    seen = []
    rope = modeling.apply_rotary_pos_emb

    def spy(q, k, *args, **kwargs):
        out = rope(q, k, *args, **kwargs)
        seen.append((q, k, *out))
        return out

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", spy)
    cap = capture_qkv(model, ids(2))
    assert len(seen) == len(cap) == 3
    for i, (q_in, k_in, q_out, k_out) in enumerate(seen):
        assert cap[i].q_pre.shape == (2, 4, S, 16) and cap[i].k_pre.shape == (2, 2, S, 16)
        torch.testing.assert_close(cap[i].q_pre, q_in, atol=0, rtol=0)
        torch.testing.assert_close(cap[i].k_pre, k_in, atol=0, rtol=0)
        torch.testing.assert_close(cap[i].q, q_out, atol=0, rtol=0)
        torch.testing.assert_close(cap[i].k, k_out, atol=0, rtol=0)
        assert cap[i].v.shape == (2, 2, S, 16)


@pytest.mark.parametrize("method", ["gate@1", "oracle-max@1"])
@pytest.mark.parametrize("name", FAMILIES)
def test_density_one_gives_dense_logits(name, method):
    """Every family, Gemma2 with its logit soft-cap on (carried into the sparse path)."""
    model = tiny(name)
    x = ids()
    dense = logits(model, x)
    kw = {"gates": GateSet.from_config(model.config, block_size=B16)} if "gate" in method else {}
    with sparsify(model, method, block_size=B16, **kw) as sp:
        out = logits(model, x)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    sliding = n_sliding(model)
    assert sp.stats.prefill_calls == 3 - sliding and sp.stats.dense_calls == sliding
    assert sp.stats.achieved_density == 1.0


def _without_softcap(model):
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    return model


@pytest.mark.parametrize("path", ["reference", "triton", "flex"])
def test_gemma2_soft_cap_is_carried_into_the_sparse_path(path, monkeypatch):
    """Gemma2 soft-caps its logits: at density 1.0 the sparse path (the reference, the Triton
    kernels under the interpreter, or eager FlexAttention) gives the model's own logits, and the
    oracle's selection sees the cap. The cap is set to 1 here so that it binds on this tiny model
    (logits of a few units): dropping it moves the logits by far more than the tolerance."""
    model = tiny("gemma2", attn_logit_softcapping=1.0)
    assert family_of(model).softcapping(model.config) == 1.0
    x = ids()
    dense = logits(model, x)
    seen = []
    real = integrate.layer_block_mask
    monkeypatch.setattr(integrate, "layer_block_mask",
                        lambda cfg, layer: seen.append(layer.softcap) or real(cfg, layer))
    flex = dict(attention="flex", compile_flex=False) if path == "flex" else {}
    with ops.use_backend("reference" if path == "flex" else path):
        with sparsify(model, "oracle-max@1", block_size=B16, **flex):
            out = logits(model, x)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    assert seen == [1.0]  # the one global layer
    uncapped = logits(_without_softcap(tiny("gemma2", attn_logit_softcapping=1.0)), x)
    assert (uncapped - dense).abs().max() > 1e-2  # what the test would miss without the cap


@pytest.mark.parametrize("target", ["exact", "kernel"])
def test_gemma2_distillation_targets_are_the_soft_capped_attention(target):
    """The cached target of each gated layer is the max-pooled map of the soft-capped attention
    (the reference's, from the captured post-RoPE Q/K/V and the model's scale), for either
    source; the cap (1, so that it binds) changes the map by far more than the tolerance."""
    model = tiny("gemma2", attn_logit_softcapping=1.0)
    x = ids()
    feats = capture_features(model, x, B16, target=target)
    cap = capture_qkv(model, x)
    scale = model.model.layers[0].self_attn.scaling
    layers = sorted({int(key.split(".")[0][1:]) for key in feats})
    assert layers
    for i in layers:
        t = cap[i]
        want = reference.pooled_attention(t.q, t.k, t.v, B16, scale=scale, softcap=1.0)[1]
        plain = reference.pooled_attention(t.q, t.k, t.v, B16, scale=scale)[1]
        torch.testing.assert_close(feats[f"L{i}.pooled"], want, atol=1e-6, rtol=1e-5)
        assert (plain - want).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen3", "phi3"])
def test_sparse_prefill_runs_on_the_global_layers(name):
    """Below density 1 the global layers really run sparse (the logits change, stay finite),
    Gemma2 with its soft-cap."""
    model = tiny(name)
    x = ids()
    dense = logits(model, x)
    with sparsify(model, "oracle-max@0.3", block_size=B16, record_masks=True) as sp:
        out = logits(model, x)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-3)
    assert sp.stats.achieved_density < 1
    assert sorted(sp.masks) == [i for i in range(3) if not family_of(model).keeps_own_attention(
        model.config, i, S)]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_distillation_step_runs(name, tmp_path):
    model = tiny(name)
    folder = build_cache(model, ids(2), tmp_path / "cache", B16, log=None)
    cache = WindowCache(folder)
    # sliding-window layers keep their window under sparsify: no gate, so no target is cached
    assert cache.layers == [i for i in range(3) if not family_of(model).keeps_own_attention(
        model.config, i, S)]
    gates = GateSet.from_config(model.config, block_size=B16)
    cfg = DistillConfig(block_size=B16, steps=2, batch_size=1, warmup=0)
    history = list(Distiller(gates, cache, cfg).steps())
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in history)


def test_mistral_sliding_window_shorter_than_the_prompt_keeps_its_window():
    """Every Mistral layer has the window; past it the layers run the model's own attention (not
    the padding error of a sliding-window mask), shorter prompts run sparse."""
    model = tiny("mistral", sliding_window=WINDOW)
    x = ids()
    dense = logits(model, x)
    gates = GateSet.from_config(model.config, block_size=B16)
    for method, kw in (("oracle-max@0.3", {}), ("gate@0.3", {"gates": gates})):
        with sparsify(model, method, block_size=B16, **kw) as sp:
            out = logits(model, x)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)  # every layer dense
        assert sp.stats.prefill_calls == 0 and sp.stats.dense_calls == 3
        short = x[:, :WINDOW]
        with sparsify(model, method, block_size=B16, **kw) as sp:
            logits(model, short)
        assert sp.stats.prefill_calls == 3 and sp.stats.dense_calls == 0  # the window covers it
    mask = torch.ones_like(x)
    mask[:, :5] = 0
    with sparsify(model, "oracle-max@0.3", block_size=B16):
        with pytest.raises(NotImplementedError, match="padding"):  # padding is still padding
            model(input_ids=x, attention_mask=mask, use_cache=False)


def test_block_rope_uses_the_global_layers_rope_settings():
    """Gemma3 keeps one rope set per layer type: the gate takes the global layers'; Phi-3 with a
    partial rotary factor leaves the unrotated part of the head dim alone, as the model does."""
    gemma3 = tiny("gemma3").config
    rope = BlockRoPE(gemma3, 16)
    theta = gemma3.rope_parameters["full_attention"]["rope_theta"]
    want = 1.0 / theta ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
    torch.testing.assert_close(rope.rotary.inv_freq, want)
    phi3 = tiny("phi3", partial_rotary_factor=0.5).config
    x = torch.randn(1, 2, 4, 16)
    y = BlockRoPE(phi3, 16)(x, B16)
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[..., :8], x[..., :8])


def test_an_unknown_family_is_refused_by_name():
    with pytest.raises(ValueError, match=r"no adapter for model type 'olmo2'.*'llama'"):
        family_of(SimpleNamespace(model_type="olmo2"))
    with pytest.raises(ValueError, match="Gemma3ForCausalLM"):
        family_of(SimpleNamespace(config=SimpleNamespace(model_type="gemma3")))
