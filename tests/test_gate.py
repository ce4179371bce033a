import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from seerlib import distill
from seerlib.gate import AttnGate, BlockRoPE, GateSet, pool_blocks


def tiny_config(**kw):
    return distill.tiny_config(**{"num_hidden_layers": 3, **kw})


def qk(B=2, Hq=4, Hkv=2, S=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g)


@pytest.mark.parametrize("S", [1, 16, 97, 128])
def test_shapes_and_block_causality(S):
    gates = GateSet.from_config(tiny_config(), block_size=16)
    q, k = qk(S=S)
    logits = gates[0](q, k)
    nb = math.ceil(S / 16)
    assert logits.shape == (2, 4, nb, nb) and logits.dtype == torch.float32
    above = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    assert torch.isneginf(logits[..., above]).all()
    assert torch.isfinite(logits[..., ~above]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_scores_are_the_logits_a_selection_reads(dtype):
    """`block_scores` (what selection takes) is `forward_pooled` on and below the block diagonal,
    in the gate's dtype, with no -inf fill above it; the selections of both are the same."""
    from seerlib.select import Selection, select_blocks

    gate = GateSet.from_config(tiny_config(), block_size=16)[0].to(dtype)
    qp, kp = gate.pool(*qk(S=97))
    scores, logits = gate.block_scores(qp, kp), gate.forward_pooled(qp, kp)
    nb = logits.shape[-1]
    below = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert scores.dtype == dtype and logits.dtype == torch.float32
    assert torch.equal(scores.float()[..., below], logits[..., below])
    assert torch.isfinite(scores[..., ~below]).all()  # computed, not filled
    sel = Selection(density=0.3)
    assert torch.equal(select_blocks(scores, sel), select_blocks(logits, sel))


def test_parameter_shapes_and_init():
    gates = GateSet.from_config(tiny_config(), block_size=16)
    assert len(gates) == 3
    g = gates[1]
    assert g.k_proj.shape == (4, 3 * 16, 16) and g.q_proj is None
    assert abs(g.k_proj.std().item() - 0.02) < 0.005
    g2 = GateSet.from_config(tiny_config(), block_size=16, q_pool=("avg", "max"), d_gate=8)[0]
    assert g2.q_proj.shape == (4, 32, 8) and g2.k_proj.shape == (4, 48, 8)
    assert set(dict(gates.named_parameters())) == {f"gates.{i}.k_proj" for i in range(3)}


def test_pooling_partial_last_block():
    x = torch.randn(1, 2, 37, 8)
    p = pool_blocks(x, 16, ("avg", "max", "min"))
    assert p.shape == (1, 2, 3, 24)
    last = x[:, :, 32:]
    torch.testing.assert_close(p[:, :, 2, :8], last.mean(2))
    torch.testing.assert_close(p[:, :, 2, 8:16], last.amax(2))
    torch.testing.assert_close(p[:, :, 2, 16:], last.amin(2))
    torch.testing.assert_close(p[:, :, 0, :8], x[:, :, :16].mean(2))
    with pytest.raises(ValueError, match="pooling"):
        pool_blocks(x, 16, ("median",))


def test_gqa_head_mapping():
    """Query heads of one kv group see the same K; changing kv head 1 touches only heads 2, 3."""
    gate = GateSet.from_config(tiny_config(), block_size=16)[0]
    q, k = qk(S=64)
    base = gate(q, k)
    k2 = k.clone()
    k2[:, 1] += torch.randn_like(k2[:, 1])
    out = gate(q, k2)
    torch.testing.assert_close(out[:, :2], base[:, :2])
    assert not torch.allclose(out[:, 2:], base[:, 2:])


def test_block_rope_positions_match_model_rope():
    """Block i is rotated as the model rotates token position i * b (YaRN scaling included)."""
    for rope in (
        {"rope_type": "default", "rope_theta": 10000.0},
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ):
        cfg = tiny_config(rope_parameters=rope)
        br = BlockRoPE(cfg, 16)
        x = torch.randn(1, 2, 5, 16)
        got = br(x, 32)
        cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(0, 160, 32)[None])
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        torch.testing.assert_close(got, want)


def test_gate_logits_depend_on_relative_block_position():
    """With RoPE, identical pooled content gives logits that depend only on i - j."""
    gate = GateSet.from_config(tiny_config(), block_size=16)[0]
    q = torch.randn(1, 4, 1, 16).expand(1, 4, 64, 16)
    k = torch.randn(1, 2, 1, 16).expand(1, 2, 64, 16)
    lg = gate(q.contiguous(), k.contiguous())
    torch.testing.assert_close(lg[..., 2, 1], lg[..., 3, 2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lg[..., 3, 1], lg[..., 2, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lg[..., 3, 0], lg[..., 3, 3])


def test_bad_shapes_say_what_was_expected():
    gate = GateSet.from_config(tiny_config(), block_size=16)[0]
    q, k = qk(S=32)
    with pytest.raises(ValueError, match="expects 4"):
        gate(q[:, :3], k)
    with pytest.raises(ValueError, match="expected"):
        gate(q, k[:, :1])
    with pytest.raises(ValueError, match="divisor"):
        AttnGate(4, 3, 16)


def test_backward_reaches_only_gate_params():
    gates = GateSet.from_config(tiny_config(), block_size=16, q_pool=("avg", "max"))
    q, k = qk(S=50)
    out = gates({0: (q, k), 2: (q, k)})
    loss = sum(torch.log_softmax(v, -1).nan_to_num(0, 0, 0).sum() for v in out.values())
    loss.backward()
    assert gates[0].k_proj.grad is not None and gates[0].q_proj.grad is not None
    assert gates[1].k_proj.grad is None
