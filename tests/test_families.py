"""Model-family adapters on tiny random models built from transformers' own config classes (no hub):
the gate reads what RoPE receives, density 1.0 gives the dense logits (Gemma2 with its logit
soft-cap, which the sparse path and the distillation targets carry), a distillation step runs,
sliding-window layers keep their window, and sparse decode (generation and teacher-forced) agrees
with itself and with dense decoding where the budget covers the context."""

from types import SimpleNamespace

import pytest
import torch

from seerlib import integrate, ops, reference
from seerlib.capture import capture_qkv
from seerlib.decode import DecodeGateSet, decode_teacher_forced, parse_decode_config
from seerlib.decode.generate import sparse_generation
from seerlib.distill import DistillConfig, Distiller
from seerlib.distill.decode import DecodeDistiller
from seerlib.families import family_of
from seerlib.gate import BlockRoPE, GateSet
from seerlib.integrate import sparsify
from seerlib.targets import WindowCache, build_cache, capture_features
from seerlib.tiny import BASE, TINY, WINDOW, tiny_family, tiny_modeling

S, B16 = 128, 16
VOCAB = BASE["vocab_size"]
FAMILIES = list(TINY)


def tiny(name, **overrides):
    try:
        return tiny_family(name, **overrides)
    except LookupError as e:  # an older transformers without the family's classes
        pytest.skip(str(e))


def ids(n=1, seed=0):
    return torch.randint(3, VOCAB, (n, S), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def n_sliding(model, length=S):
    """Layers that keep the model's own attention (a sliding window) at `length` tokens."""
    cfg = model.config
    return sum(family_of(cfg).keeps_own_attention(cfg, i, length)
               for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_gives_what_rope_receives(name, monkeypatch):
    """pre-RoPE Q/K as the model's own rotary application receives them (after q_norm / k_norm,
    split out of a fused qkv_proj), and post-RoPE Q/K as it returns them."""
    model = tiny(name)
    modeling = tiny_modeling(name)
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


# ---------------------------------------------------------------- decode (SeerAttention-R)

PROMPT, NEW = 70, 12


def _generate(model, x, cfg=None, gates=None):
    """Greedy generation from prompts x (B, PROMPT), dense or under `sparse_generation`:
    (sequences (B, PROMPT + NEW), step logits (B, NEW, vocab), the decode stats or None)."""
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        if cfg is None:
            res = model.generate(x, **kw)
            return res.sequences, torch.stack(res.scores, 1), None
        with sparse_generation(model, cfg, decode_gates=gates) as sg:
            res = model.generate(x, **kw)
    return res.sequences, torch.stack(res.scores, 1), sg.stats


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_with_a_covering_budget_gives_dense_generation(name):
    """Every family (Gemma2 soft-capped, Gemma2/3 hybrid with a window shorter than the prompt):
    a token budget that covers the context decodes as dense, the same tokens and step logits,
    and every global layer's step ran as a sparse decode step."""
    model = tiny(name)
    x = ids(2)[:, :PROMPT]
    seq, scores, _ = _generate(model, x)
    cfg = parse_decode_config("gate@tok=4096", B16)
    sparse, sparse_scores, stats = _generate(model, x, cfg, DecodeGateSet(model.config,
                                                                          block_size=B16))
    assert torch.equal(sparse, seq)
    torch.testing.assert_close(sparse_scores, scores, atol=1e-4, rtol=1e-4)
    assert stats.steps == (NEW - 1) * (3 - n_sliding(model, PROMPT)) and stats.kept_share == 1.0


@pytest.mark.parametrize("label", ["gate@tok=32", "quest@tok=32"])
@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_decode_generation_equals_teacher_forced_decode(name, label):
    """Under a binding budget (2 of up to 6 key blocks) each family's generated step logits are
    the teacher-forced sparse decode's at the same rows: the KV cache, the decode gate's inputs
    (RoPE's, after q/k norms, out of a fused qkv) and the sliding layers agree across the two
    paths; the decode really is sparse and moves the logits off the dense ones. No pad token: its
    embedding is zero, and a generated pad would give a zero query, whose block scores all tie."""
    model = tiny(name, pad_token_id=None)
    x = ids(2)[:, :PROMPT]
    cfg = parse_decode_config(label, B16)
    gates = DecodeGateSet(model.config, block_size=B16) if cfg.spec.needs_gate else None
    seq, scores, stats = _generate(model, x, cfg, gates)
    with torch.no_grad(), decode_teacher_forced(model, cfg, gates, prefix=PROMPT):
        forced = model(seq, use_cache=False).logits
    torch.testing.assert_close(forced[:, PROMPT - 1:PROMPT - 1 + NEW], scores, atol=1e-4,
                               rtol=1e-4)
    assert stats.kept_share < 1 and torch.isfinite(scores).all()
    dense = logits(model, seq)
    rows = slice(PROMPT, PROMPT - 1 + NEW)
    assert (dense[:, rows] - forced[:, rows]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_a_decode_distillation_step_runs(name):
    model = tiny(name)
    gates = DecodeGateSet(model.config, block_size=B16)
    cfg = DistillConfig(block_size=B16, steps=2, batch_size=1, warmup=0, recall_tokens=(32,))
    history = list(DecodeDistiller(gates, cfg=cfg, model=model, windows=ids(2), rows=16).steps())
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
