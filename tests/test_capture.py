"""Q/K/V capture: shapes, RoPE relation, and that it reproduces the model's own attention."""

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from seerlib import reference as R
from seerlib.capture import attention_override, capture_qkv
from seerlib.distill import tiny_config


def tiny_llama():
    cfg = tiny_config(vocab_size=97, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                      head_dim=16, max_position_embeddings=512, initializer_range=0.02)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_capture_shapes_rope_and_output():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 70))
    cap = capture_qkv(model, ids, layers=[0, 2])
    assert sorted(cap) == [0, 2]
    L = cap[2]
    assert L.q_pre.shape == L.q.shape == (2, 6, 70, 16)
    assert L.k_pre.shape == L.k.shape == L.v.shape == (2, 2, 70, 16)
    cos, sin = model.model.rotary_emb(L.q_pre, torch.arange(70)[None])
    q, k = apply_rotary_pos_emb(L.q_pre, L.k_pre, cos, sin)
    torch.testing.assert_close(q, L.q)
    torch.testing.assert_close(k, L.k)
    # The captured tensors reproduce what the layer fed to o_proj.
    seen = {}
    h = model.model.layers[2].self_attn.o_proj.register_forward_hook(
        lambda m, a, o: seen.setdefault("x", a[0])
    )
    with torch.no_grad():
        model(ids)
    h.remove()
    ours = R.attention(L.q, L.k, L.v).transpose(1, 2).reshape(2, 70, -1)
    torch.testing.assert_close(ours, seen["x"], atol=1e-5, rtol=1e-4)


def test_override_restores_and_reaches_every_layer():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
    calls = []

    def zero_attention(module, q, k, v, mask, *, default, **kw):
        calls.append(module.layer_idx)
        out, _ = default(module, q, k, v, mask, **kw)
        return torch.zeros_like(out), None

    with attention_override(model, zero_attention), torch.no_grad():
        changed = model(ids).logits
    assert calls == [0, 1, 2]
    assert not torch.allclose(changed, before)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_bad_layers_are_named():
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist; the model has layers 0..2"):
        capture_qkv(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), layers=[7])


@pytest.mark.model
def test_capture_on_smollm(smollm):
    from seerlib.data import token_windows

    model, tok = smollm
    cap = capture_qkv(model, token_windows(tok, "eval", 128, n=1), layers=[29])
    assert cap[29].q.shape == (1, 9, 128, 64) and cap[29].k.shape == (1, 3, 128, 64)
