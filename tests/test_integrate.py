import copy
import math

import pytest
import torch
from transformers import LlamaConfig

from seerlib import reference
from seerlib.gate import GateSet
from seerlib.integrate import (
    SparseConfig,
    _sparse_attention,
    layer_block_mask,
    sparsify,
    sparsify_config,
    to_flex_block_mask,
    topk_density,
)
from seerlib.select import achieved_density, select_blocks

B16 = 16  # small blocks, so a 192-token slice has 12 blocks per row
S = 192


def qkv(B=1, Hq=4, Hkv=2, S=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g),
            torch.randn(B, Hkv, S, d, generator=g))


# ---------------------------------------------------------------- FlexAttention (no model)


@pytest.mark.parametrize("S_, b", [(100, 16), (128, 32), (97, 8)])
def test_flex_block_mask_round_trips(S_, b):
    nb = math.ceil(S_ / b)
    mask = select_blocks(torch.randn(2, 3, nb, nb), density=0.4)
    mask[0, 0, -1, 0] = True  # an off-diagonal block the top-k might not have picked
    bm = to_flex_block_mask(mask, S_, b)
    assert bm.BLOCK_SIZE == (b, b) and bm.seq_lengths == (S_, S_)
    assert torch.equal(bm.to_dense()[..., :nb, :nb].bool(), mask)
    # tiles above the diagonal are never kept
    upper = torch.ones(2, 3, nb, nb, dtype=torch.bool)
    assert torch.equal(to_flex_block_mask(upper, S_, b).to_dense()[..., :nb, :nb].bool(),
                       upper.tril())


def test_flex_block_mask_errors():
    with pytest.raises(ValueError, match=r"needs \(B, H, 7, 7\)"):
        to_flex_block_mask(torch.ones(1, 1, 6, 6, dtype=torch.bool), 100, 16)
    with pytest.raises(ValueError, match="torch.bool"):
        to_flex_block_mask(torch.ones(1, 1, 7, 7), 100, 16)


@pytest.mark.parametrize("S_, b", [(100, 16), (64, 64)])
def test_flex_path_matches_reference_block_sparse(S_, b):
    q, k, v = qkv(S=S_)
    nb = math.ceil(S_ / b)
    mask = select_blocks(torch.randn(1, 4, nb, nb), density=0.4)
    cfg = SparseConfig("sink_window", density=0.4, block_size=b, attention="flex",
                       compile_flex=False)
    out = _sparse_attention(q, k, v, mask, cfg, 0.25)
    ref = reference.block_sparse_attention(q, k, v, mask, b, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_compiled_flex_skips_dropped_tiles_exactly():
    """The path the evaluation runs: compiled flex_attention with the plain causal mask_mod."""
    q, k, v = qkv(S=96)
    mask = select_blocks(torch.randn(1, 4, 6, 6), density=0.3)
    cfg = SparseConfig("sink_window", density=0.3, block_size=16, attention="flex")
    out = _sparse_attention(q, k, v, mask, cfg, 0.25)
    ref = reference.block_sparse_attention(q, k, v, mask, 16, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- selections (no model)


def test_topk_modes_keep_equal_density_and_vertical_slash_is_close():
    q, k, v = qkv(S=64 * 48, d=16, seed=1)
    nb = 48
    cfgs = {m: SparseConfig(m, density=0.3) for m in ("oracle", "sink_window", "vertical_slash")}
    masks = {m: layer_block_mask(c, q, k, v) for m, c in cfgs.items()}
    masks["gate-like"] = select_blocks(torch.randn(1, 4, nb, nb), density=0.3)
    dens = {m: achieved_density(x) for m, x in masks.items()}
    assert dens["oracle"] == dens["sink_window"] == dens["gate-like"]
    assert dens["oracle"] == pytest.approx(topk_density(0.3, nb)) and 0.25 < dens["oracle"] <= 0.3
    assert abs(dens["vertical_slash"] - dens["oracle"]) < 0.03


def test_oracle_threshold_selects_on_the_normalized_map():
    w = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.05, 0.05, 0.9]]).expand(1, 1, 3, 3)
    q, k, v = qkv(Hq=1, Hkv=1, S=48)
    mask = layer_block_mask(SparseConfig("oracle", threshold=0.2, block_size=16), q, k, v,
                            weights=w)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False],
                                   [False, False, True]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="sparse", density=0.3), "unknown mode 'sparse'"),
        (dict(mode="oracle", density=0.3, threshold=0.01), "not both"),
        (dict(mode="oracle"), "needs a density or a threshold"),
        (dict(mode="sink_window", threshold=0.01), "density only"),
        (dict(mode="oracle", density=1.5), r"density must be in \(0, 1\]"),
        (dict(mode="oracle", density=0.3, pooling="mean"), "pooling must be one of"),
        (dict(mode="oracle", density=0.3, attention="cuda"), "attention must be one of"),
        (dict(mode="gate", density=0.3), "needs gates=GateSet"),
        (dict(mode="dense", density=0.5), "keeps every block"),
        (dict(mode="vertical_slash", density=0.3, adaptive=True), "adaptive selection needs"),
        (dict(mode="oracle", threshold=0.01, adaptive=True), "adaptive selection needs"),
        (dict(mode="oracle", density=0.3, relative=True), "relative ranking .* adaptive=True"),
        (dict(mode="oracle", density=0.3, row_floor=0.5), "row_floor .* adaptive=True"),
        (dict(mode="oracle", density=0.3, adaptive=True, row_floor=-0.1), r"row_floor must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    model = _TinyModel()
    mode = kwargs.pop("mode")
    with pytest.raises(ValueError, match=match):
        sparsify(model, mode, **kwargs)


def test_sparsify_config_takes_every_setting_from_the_config():
    model = _TinyModel()
    gates = GateSet.from_config(model.config, block_size=16)
    for cfg in [SparseConfig("gate", density=0.3, block_size=16, keep_sink=True, keep_local=2,
                             adaptive=True, relative=True, row_floor=0.5, attention="flex",
                             compile_flex=False),
                SparseConfig("oracle", threshold=0.01, pooling="sum", dense_last_rows=1),
                SparseConfig("sink_window", density=0.2, num_sink=2)]:
        sp = sparsify_config(model, cfg, gates=gates)  # gates go to "gate" mode only
        assert sp.config == cfg
        assert (sp.gates is gates) == (cfg.mode == "gate")


def test_gates_for_another_model_are_refused():
    model = _TinyModel()
    other = GateSet.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=101),
                                block_size=16)
    with pytest.raises(ValueError, match="config hash"):
        sparsify(model, "gate", gates=other, density=0.3)
    mine = GateSet.from_config(model.config, block_size=16)
    with pytest.raises(ValueError, match="block size 16; sparsify was given 32"):
        sparsify(model, "gate", gates=mine, density=0.3, block_size=32)
    with pytest.raises(ValueError, match="GateSet"):
        sparsify(model, "gate", gates={"not": "gates"}, density=0.3)
    with pytest.raises(ValueError, match="only used by mode 'gate'"):
        sparsify(model, "oracle", gates=mine, density=0.3)


class _TinyModel(torch.nn.Module):
    """Enough of a model for argument checks: a config and one attention-like module."""

    def __init__(self):
        super().__init__()
        self.config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=103)
        attn = torch.nn.Module()
        attn.q_proj = attn.k_proj = attn.v_proj = torch.nn.Identity()
        attn.layer_idx = 0
        self.attn = attn


# ---------------------------------------------------------------- the real model



@pytest.fixture(scope="module")
def slice_ids(small):
    from seerlib.data import token_windows

    return token_windows(small[1], "eval", S, n=1)


@pytest.fixture(scope="module")
def dense_logits(small, slice_ids):
    with torch.no_grad():
        return small[0](input_ids=slice_ids, use_cache=False).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.model
@pytest.mark.parametrize(
    "mode, kw",
    [("gate", {}), ("oracle", {"pooling": "max"}), ("oracle", {"pooling": "sum"}),
     ("sink_window", {}), ("vertical_slash", {})],
)
def test_density_one_reproduces_dense_logits(small, slice_ids, dense_logits, mode, kw):
    model = small[0]
    if mode == "gate":
        kw = {"gates": GateSet.from_config(model.config, block_size=B16)}
    with sparsify(model, mode, density=1.0, block_size=B16, **kw) as sp:
        out = _logits(model, slice_ids)
    assert sp.stats.achieved_density == 1.0
    assert sp.stats.prefill_calls == model.config.num_hidden_layers
    torch.testing.assert_close(out, dense_logits, atol=2e-3, rtol=1e-3)


@pytest.mark.model
def test_sparse_modes_reach_the_same_density_and_change_the_logits(small, slice_ids,
                                                                   dense_logits):
    model = small[0]
    gates = GateSet.from_config(model.config, block_size=B16)
    achieved = {}
    for mode, kw in [("gate", {"gates": gates}), ("oracle", {}), ("oracle", {"pooling": "sum"}),
                     ("sink_window", {}), ("vertical_slash", {}),
                     ("gate", {"gates": gates, "adaptive": True, "keep_sink": True,
                               "keep_local": 1}),
                     ("gate", {"gates": gates, "adaptive": True, "keep_sink": True,
                               "keep_local": 1, "relative": True, "row_floor": 0.5}),
                     ("oracle", {"adaptive": True})]:
        with sparsify(model, mode, density=0.5, block_size=B16, record_masks=True, **kw) as sp:
            out = _logits(model, slice_ids)
        label = (f"{mode}-{kw.get('pooling', '')}{'-a' * kw.get('adaptive', False)}"
                 f"{'-r' * kw.get('relative', False)}{'-f' * bool(kw.get('row_floor'))}")
        achieved[label] = sp.stats.achieved_density
        assert len(sp.masks) == model.config.num_hidden_layers
        assert not torch.allclose(out, dense_logits, atol=1e-2)  # really sparse
        assert torch.isfinite(out).all()
    topk = {v for k, v in achieved.items() if not k.startswith("vertical")}
    assert topk == {topk_density(0.5, S // B16)}, achieved  # gate, oracles, sink+window: same k
    assert abs(achieved["vertical_slash-"] - topk.pop()) < 0.1, achieved


@pytest.mark.model
def test_threshold_gate_and_oracle(small, slice_ids):
    model = small[0]
    with sparsify(model, "oracle", threshold=0.02, pooling="sum", block_size=B16) as sp:
        _logits(model, slice_ids)
    lo = sp.stats.achieved_density
    with sparsify(model, "oracle", threshold=0.002, pooling="sum", block_size=B16) as sp:
        _logits(model, slice_ids)
    assert 0 < lo < sp.stats.achieved_density < 1  # a lower threshold keeps more


@pytest.mark.model
def test_decode_steps_stay_dense(small, slice_ids):
    model = small[0]
    n_layers = model.config.num_hidden_layers
    with torch.no_grad(), sparsify(model, "sink_window", density=0.3, block_size=B16) as sp:
        pre = model(input_ids=slice_ids, use_cache=True)
        cache = copy.deepcopy(pre.past_key_values)
        nxt = pre.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, past_key_values=pre.past_key_values, use_cache=True).logits
    assert sp.stats.prefill_calls == n_layers and sp.stats.dense_calls == n_layers
    with torch.no_grad():  # the same decode step outside sparsify, from the same (sparse) cache
        ref = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step, ref)


@pytest.mark.model
def test_attention_restored_after_exit_and_permanent_form(small, slice_ids, dense_logits):
    model = small[0]
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with sparsify(model, "sink_window", density=0.2, block_size=B16):
            assert model.config._attn_implementation != before
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    torch.testing.assert_close(_logits(model, slice_ids), dense_logits)

    sp = sparsify(model, "sink_window", density=0.2, block_size=B16).enable()
    try:
        assert sp.enabled
        sparse = _logits(model, slice_ids)
        assert not torch.allclose(sparse, dense_logits, atol=1e-2)
        with pytest.raises(RuntimeError, match="already enabled"):
            sp.enable()
    finally:
        sp.disable()
    assert not sp.enabled and model.config._attn_implementation == before
    torch.testing.assert_close(_logits(model, slice_ids), dense_logits)


@pytest.mark.model
def test_padding_is_refused(small, slice_ids):
    model = small[0]
    mask = torch.ones_like(slice_ids)
    mask[:, :5] = 0
    with sparsify(model, "sink_window", density=0.3, block_size=B16):
        with pytest.raises(NotImplementedError, match="padding"):
            model(input_ids=slice_ids, attention_mask=mask, use_cache=False)
