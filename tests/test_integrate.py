import copy
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig

from seerlib import ops, reference
from seerlib.gate import AttnGate, GateSet
from seerlib.graphs import StepGraphs
from seerlib.integrate import graphed_gate_step, sparsify
from seerlib.methods import PRESETS, LayerInputs, SparseConfig, layer_block_mask, parse_config
from seerlib.select import Selection, topk_density

B16 = 16  # small blocks, so a 192-token slice has 12 blocks per row
S = 192


# ---------------------------------------------------------------- arguments (no model)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("sparse@0.3",), {}, "unknown method 'sparse'"),
        (("oracle-max@0.3",), {"attention": "cuda"}, "attention must be one of"),
        (("gate@0.3",), {}, "needs gates=GateSet"),
        (("recommended",), {}, "needs gates=GateSet"),
        (("dense@0.5",), {}, "keeps every block"),
        (("oracle-max@0.3",), {"selection": Selection(density=0.3)}, "selection= goes with"),
        (("oracle-max",), {"selection": Selection()}, "needs a density or a threshold"),
        ((0.3,), {}, "expected a SparseConfig, a preset name"),
        (("sink_window@0.3",), {"oracle_weights": {}}, "only used by the oracle methods"),
    ],
)
def test_bad_arguments_are_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparsify(_TinyModel(), *args, **kwargs)


def test_sparsify_takes_a_config_a_preset_a_label_or_a_method_and_selection():
    model = _TinyModel()
    gates = GateSet.from_config(model.config, block_size=16)
    cfg = SparseConfig("gate", Selection(density=0.3, budget="relative", row_floor=0.5,
                                         forced={"sink": 1, "local": 2}),
                       block_size=16, attention="flex", compile_flex=False)
    assert sparsify(model, cfg, gates=gates).config == cfg
    assert sparsify(model, cfg.label, gates=gates, attention="flex",
                    compile_flex=False).config == cfg  # block size from the gates
    assert sparsify(model, "gate", selection=cfg.selection, gates=gates, attention="flex",
                    compile_flex=False).config == cfg
    rec = sparsify(model, "recommended", gates=gates).config
    assert rec == replace(PRESETS["recommended"], block_size=16)  # the gates' block size
    oracle = sparsify(model, "oracle-sum+last@t=0.01")
    assert oracle.config == parse_config("oracle-sum+last@t=0.01") and oracle.gates is None
    assert sparsify(model, "sink_window+sink2@0.2").config.selection.count("sink") == 2


def test_gates_for_another_model_are_refused():
    model = _TinyModel()
    other = GateSet.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=101),
                                block_size=16)
    with pytest.raises(ValueError, match="config hash"):
        sparsify(model, "gate@0.3", gates=other)
    mine = GateSet.from_config(model.config, block_size=16)
    with pytest.raises(ValueError, match="block size 16; sparsify was given 32"):
        sparsify(model, "gate@0.3", gates=mine, block_size=32)
    with pytest.raises(ValueError, match="GateSet"):
        sparsify(model, "gate@0.3", gates={"not": "gates"})
    with pytest.raises(ValueError, match="only used by methods that read a gate"):
        sparsify(model, "oracle-max@0.3", gates=mine)


@pytest.mark.slow
def test_compiled_selection_gives_the_eager_masks_and_logits():
    """`compile_selection=True` (the gate and selection through torch.compile, inductor's C++
    backend on a CPU) selects exactly the eager blocks on every layer and gives the same logits,
    for top-k and for the recommended preset's layer budget with forced blocks."""
    from seerlib.tiny import tiny_family

    model = tiny_family("llama")
    ids = torch.randint(3, 101, (1, S), generator=torch.Generator().manual_seed(0))
    gates = GateSet.from_config(model.config, block_size=B16)
    for cfg in ("gate@0.3", replace(PRESETS["recommended"].at(density=0.3), block_size=B16)):
        runs = []
        for compiled in (False, True):
            with sparsify(model, cfg, gates=gates, block_size=B16, record_masks=True,
                          compile_selection=compiled) as sp:
                runs.append((_logits(model, ids), dict(sp.masks), sp.stats.achieved_density))
        (eager, eager_masks, eager_d), (comp, comp_masks, comp_d) = runs
        assert sorted(comp_masks) == [0, 1, 2] and eager_d == comp_d < 0.7
        for layer, mask in eager_masks.items():
            assert torch.equal(comp_masks[layer], mask), (cfg, layer)
        torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)


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


def _as_config(x):
    return x if isinstance(x, SparseConfig) else parse_config(x)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.model
@pytest.mark.parametrize("method", ["gate", "oracle-max", "oracle-sum", "sink_window",
                                    "vertical_slash"])
def test_density_one_reproduces_dense_logits(small, slice_ids, dense_logits, method):
    model = small[0]
    kw = {}
    if method == "gate":
        kw = {"gates": GateSet.from_config(model.config, block_size=B16)}
    with sparsify(model, f"{method}@1", block_size=B16, **kw) as sp:
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
    for label in ["gate@0.5", "oracle-max@0.5", "oracle-sum@0.5", "sink_window@0.5",
                  "vertical_slash@0.5", "gate+sink+local@a=0.5",
                  PRESETS["recommended"].at(density=0.5), "oracle-max@a=0.5"]:
        cfg = replace(_as_config(label), block_size=B16)
        kw = {"gates": gates} if cfg.spec.needs_gate else {}
        with sparsify(model, cfg, record_masks=True, **kw) as sp:
            out = _logits(model, slice_ids)
        achieved[cfg.label] = sp.stats.achieved_density
        assert len(sp.masks) == model.config.num_hidden_layers
        assert not torch.allclose(out, dense_logits, atol=1e-2)  # really sparse
        assert torch.isfinite(out).all()
    topk = {v for k, v in achieved.items() if not k.startswith("vertical")}
    assert topk == {topk_density(0.5, S // B16)}, achieved  # gate, oracles, sink+window: same k
    assert abs(achieved["vertical_slash@0.5"] - topk.pop()) < 0.1, achieved


@pytest.mark.model
def test_threshold_gate_and_oracle(small, slice_ids):
    model = small[0]
    with sparsify(model, "oracle-sum@t=0.02", block_size=B16) as sp:
        _logits(model, slice_ids)
    lo = sp.stats.achieved_density
    with sparsify(model, "oracle-sum@t=0.002", block_size=B16) as sp:
        _logits(model, slice_ids)
    assert 0 < lo < sp.stats.achieved_density < 1  # a lower threshold keeps more


@pytest.mark.model
def test_decode_steps_stay_dense(small, slice_ids):
    model = small[0]
    n_layers = model.config.num_hidden_layers
    with torch.no_grad(), sparsify(model, "sink_window@0.3", block_size=B16) as sp:
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
        with sparsify(model, "sink_window@0.2", block_size=B16):
            assert model.config._attn_implementation != before
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    torch.testing.assert_close(_logits(model, slice_ids), dense_logits)

    sp = sparsify(model, "sink_window@0.2", block_size=B16).enable()
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
    with sparsify(model, "sink_window@0.3", block_size=B16):
        with pytest.raises(NotImplementedError, match="padding"):
            model(input_ids=slice_ids, attention_mask=mask, use_cache=False)


@pytest.mark.model
def test_a_new_forced_rule_and_a_new_method_work_end_to_end(small, slice_ids, dense_logits):
    """Extension through the public points only: `seerlib.forced_rule` and
    `seerlib.register_method` (then a label names both)."""
    import seerlib
    from seerlib.methods import METHODS
    from seerlib.select import FORCED_BLOCKS

    model = small[0]

    @seerlib.forced_rule("every_other")
    def every_other(nb, n, device=None):
        """Every n-th key block from block 0: (nb, nb) bool."""
        out = torch.zeros(nb, nb, dtype=torch.bool, device=device)
        out[:, ::n + 1] = True
        return out

    @seerlib.register_method("recent_first")
    def recent_first(layer, selection):
        """Rank key blocks by recency (a sliding window by score) through the Selection."""
        nb = layer.nb
        score = torch.arange(nb, dtype=torch.float32).expand(*layer.q.shape[:2], nb, nb)
        return seerlib.select_blocks(score, selection)

    try:
        with sparsify(model, "recent_first+every_other5@0.5", block_size=B16,
                      record_masks=True) as sp:
            out = _logits(model, slice_ids)
        nb = S // B16
        mask = sp.masks[0]
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        assert mask[..., causal & every_other(nb, 5)].all()  # the forced rule held
        assert sp.config.label == "recent_first+every_other5@0.5"
        assert sp.stats.achieved_density == topk_density(0.5, nb)  # forced blocks count toward k
        assert torch.isfinite(out).all() and not torch.allclose(out, dense_logits, atol=1e-2)
        with sparsify(model, "recent_first@1", block_size=B16):
            torch.testing.assert_close(_logits(model, slice_ids), dense_logits, atol=2e-3,
                                       rtol=1e-3)
    finally:
        METHODS.pop("recent_first")
        FORCED_BLOCKS.pop("every_other")


@pytest.mark.model
def test_a_second_handle_is_refused_until_the_first_is_disabled(small, slice_ids, dense_logits):
    model = small[0]
    first = sparsify(model, "sink_window@0.2", block_size=B16).enable()
    second = sparsify(model, "sink_window@0.3", block_size=B16)
    try:
        with pytest.raises(RuntimeError, match="already runs another sparsify handle"):
            second.enable()
        assert not second.enabled and first.enabled
        sparse = _logits(model, slice_ids)
        assert not torch.allclose(sparse, dense_logits, atol=1e-2)  # still the first's
    finally:
        first.disable()
    with second:  # now it may
        assert second.enabled
        assert not torch.allclose(_logits(model, slice_ids), dense_logits, atol=1e-2)
    assert not second.enabled
    torch.testing.assert_close(_logits(model, slice_ids), dense_logits)


def test_oracle_weights_of_another_shape_are_named():
    from seerlib.methods import LayerInputs, layer_block_mask

    q, k = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 5, 5\); 128 tokens .* \(1, 4, 8, 8\)"):
        layer_block_mask(parse_config("oracle-max@0.3", block_size=16),
                         LayerInputs(q, k, k, 16, weights=torch.rand(1, 4, 5, 5)))


def test_transposed_out_is_only_made_for_the_kernel_path():
    from seerlib.integrate import _transposed_out

    q, k = torch.randn(1, 4, 33, 16), torch.randn(1, 2, 33, 16)
    assert _transposed_out(q, k, k) is None  # a CPU tensor: the reference path returns its own


@pytest.mark.parametrize("keep_mask,forced", [(True, {}), (False, {}), (False, {"sink": 1,
                                                                               "local": 2})])
def test_graphed_gate_step_gives_the_gate_methods_mask_and_attention(keep_mask, forced):
    """`graphed_gate_step` with its graph replaced by a plain call (CUDA graphs need a GPU) and
    the Triton kernels under the interpreter: the pooled statics, the mask, the kept count and
    the (B, S, Hq, d) output are the eager gate method's; without keep_mask the selection and
    index are the one-launch kernel's (`ops.select_index`)."""
    class Called(StepGraphs):
        def replay(self, key, fn, statics):
            return fn(*statics)

    torch.manual_seed(0)
    S, b, d = 97, 16, 16
    gate = AttnGate(4, 2, d, block_size=b)
    q, q_pre = torch.randn(1, 4, S, d), torch.randn(1, 4, S, d)
    k, v, k_pre = (torch.randn(1, 2, S, d) for _ in range(3))
    sel = Selection(density=0.4, forced=forced)
    assert ops.select_index_fused(sel)
    graphs = Called()
    with ops.use_backend("triton"):
        out, kept, mask = graphed_gate_step(graphs, 0, gate, sel, q, k, v, q_pre, k_pre, b,
                                            scale=d ** -0.5, keep_mask=keep_mask)
    want = layer_block_mask(SparseConfig("gate", sel, block_size=b),
                            LayerInputs(q, k, v, b, gate=gate, q_pre=q_pre, k_pre=k_pre))
    assert (mask is None) != keep_mask and (mask is None or torch.equal(mask, want))
    assert int(kept) == int(want.tril().sum())
    assert out.shape == (1, S, 4, d) and out.is_contiguous()
    expected = reference.block_sparse_attention(q, k, v, want, b, scale=d ** -0.5)
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=2e-5, rtol=2e-5)
    qp, kp = gate.pool(q_pre, k_pre)  # the statics hold the pooled features
    specs = [((1, 4, 7, qp.shape[-1]), torch.float32, q.device),
             ((1, 2, 7, kp.shape[-1]), torch.float32, q.device)]
    got_qp, got_kp = graphs.statics(specs)
    torch.testing.assert_close(got_qp, qp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_kp, kp, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("label", ["gate@0.3", "gate+sink+local2@0.3", "recommended"])
def test_gate_layers_on_the_kernel_path_index_without_a_mask(label, monkeypatch):
    """On the kernel path (here the Triton kernels under the interpreter) a gate layer goes from
    its logits straight to the block index (`ops.select_index`: one launch for top-k per row,
    forced blocks included; select_blocks + the index for the preset's layer budget) unless the
    masks are recorded: the logits and kept counts are the mask path's."""
    from seerlib.tiny import tiny_family

    model = tiny_family("llama")
    ids = torch.randint(3, 101, (1, S), generator=torch.Generator().manual_seed(1))
    gates = GateSet.from_config(model.config, block_size=B16)
    cfg = (replace(PRESETS["recommended"].at(density=0.3), block_size=B16)
           if label == "recommended" else parse_config(label, block_size=B16))
    calls = []
    select_index = ops.select_index
    monkeypatch.setattr(ops, "select_index", lambda *a, **k: calls.append(1) or
                        select_index(*a, **k))
    runs = []
    for record in (True, False):
        with ops.use_backend("triton"), sparsify(model, cfg, gates=gates, block_size=B16,
                                                 record_masks=record) as sp:
            runs.append((_logits(model, ids), sp.stats.per_layer, len(sp.masks)))
    (masked, masked_kept, n_masks), (indexed, indexed_kept, n_none) = runs
    assert len(calls) == 3 and n_masks == 3 and n_none == 0  # one index per layer, no masks
    assert indexed_kept == masked_kept
    assert 0 < sum(k for k, _ in indexed_kept.values()) < sum(c for _, c in indexed_kept.values())
    torch.testing.assert_close(indexed, masked, atol=1e-5, rtol=1e-5)
