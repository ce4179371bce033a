import json
import random
from pathlib import Path

import pytest
import torch

from seerlib import methods, patterns, reference
from seerlib.methods import (
    METHODS,
    PRESETS,
    LayerInputs,
    SparseConfig,
    gate_block_mask,
    layer_block_mask,
    parse_config,
    preset,
    resolve_config,
)
from seerlib.select import FORCED_BLOCKS, Selection, achieved_density, select_blocks, topk_density

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def qkv(B=1, Hq=4, Hkv=2, S=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g),
            torch.randn(B, Hkv, S, d, generator=g))


def test_topk_methods_keep_equal_density_and_vertical_slash_is_close():
    q, k, v = qkv(S=64 * 48, d=16, seed=1)
    nb = 48
    layer = LayerInputs(q, k, v, 64)
    cfgs = {m: SparseConfig(m, Selection(density=0.3))
            for m in ("oracle-max", "sink_window", "vertical_slash")}
    masks = {m: layer_block_mask(c, layer) for m, c in cfgs.items()}
    masks["gate-like"] = select_blocks(torch.randn(1, 4, nb, nb), Selection(density=0.3))
    dens = {m: achieved_density(x) for m, x in masks.items()}
    assert dens["oracle-max"] == dens["sink_window"] == dens["gate-like"]
    assert dens["oracle-max"] == pytest.approx(topk_density(0.3, nb))
    assert 0.25 < dens["oracle-max"] <= 0.3
    assert abs(dens["vertical_slash"] - dens["oracle-max"]) < 0.03


def test_oracle_threshold_selects_on_the_normalized_map():
    w = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.05, 0.05, 0.9]]).expand(1, 1, 3, 3)
    q, k, v = qkv(Hq=1, Hkv=1, S=48)
    mask = layer_block_mask(parse_config("oracle-max@t=0.2", block_size=16),
                            LayerInputs(q, k, v, 16, weights=w))
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False],
                                   [False, False, True]]


def test_sink_window_reads_its_sink_count_from_the_selection():
    q, k, v = qkv(S=64 * 16)
    layer = LayerInputs(q, k, v, 64)
    one = layer_block_mask(parse_config("sink_window@0.5"), layer)
    two = layer_block_mask(parse_config("sink_window+sink2@0.5"), layer)
    assert one[..., 8:, 0].all() and not one[..., 8:, 1].any()
    assert two[..., 8:, :2].all()
    assert achieved_density(one) == achieved_density(two)  # sinks count toward k


@pytest.mark.parametrize(
    "label, match",
    [
        ("sparse@0.3", "unknown method 'sparse'"),
        ("oracle-max", "needs a density or a threshold"),
        ("sink_window@t=0.01", "density only"),
        ("oracle-max@1.5", r"density must be in \(0, 1\]"),
        ("oracle-mean@0.3", "unknown method 'oracle-mean'"),
        ("dense@0.5", "keeps every block"),
        ("vertical_slash@a=0.3", "no layer budget"),
        ("oracle-max@a=t=0.01", "cannot read"),
        ("oracle-max+floor0.5@0.3", "row_floor .* needs budget='layer'"),
        ("oracle-max+floor-0.1@a=0.3", r"row_floor must be in \[0, 1\]"),
        ("sink_window+local@0.3", r"does not honour \+local"),
        ("vertical_slash+sink@0.3", r"does not honour \+sink"),
        ("gate+snk@0.3", "cannot read '\\+snk'"),
    ],
)
def test_bad_configs_are_clear_errors(label, match):
    with pytest.raises(ValueError, match=match):
        parse_config(label)


def test_config_checks_its_attention_and_block_size():
    with pytest.raises(ValueError, match="attention must be one of"):
        SparseConfig("oracle-max", Selection(density=0.3), attention="cuda")
    with pytest.raises(ValueError, match="block"):
        SparseConfig("oracle-max", Selection(density=0.3), block_size=0)
    with pytest.raises(ValueError, match="selection must be a seerlib Selection"):
        SparseConfig("gate", {"density": 0.3})


def _random_config(rng: random.Random) -> SparseConfig:
    method = rng.choice([m for m in METHODS if METHODS[m].sparse])
    spec = METHODS[method]
    kw: dict = {"density": rng.choice([0.05, 0.1, 0.3, 0.5, 1.0])}
    if spec.threshold and rng.random() < 0.3:
        kw = {"threshold": rng.choice([0.0, 0.002, 0.01])}
    if "budget" in spec.rules and "density" in kw and rng.random() < 0.6:
        kw["budget"] = rng.choice(["row", "layer", "relative"])
        if kw["budget"] != "row" and rng.random() < 0.5:
            kw["row_floor"] = rng.choice([0.25, 0.5, 1.0])
    allowed = list(FORCED_BLOCKS) if "forced" in spec.rules else list(spec.rules)
    kw["forced"] = {n: rng.randint(1, 3) for n in allowed if rng.random() < 0.4}
    return SparseConfig(method, Selection(**kw), block_size=rng.choice([16, 64]))


def test_labels_round_trip_on_presets_and_random_configs():
    for name, cfg in PRESETS.items():
        assert parse_config(cfg.label) == cfg, name
        assert resolve_config(name) == cfg
    assert parse_config("dense") == SparseConfig("dense")
    rng = random.Random(0)
    for _ in range(300):
        cfg = _random_config(rng)
        assert parse_config(cfg.label, block_size=cfg.block_size) == cfg, cfg.label


def test_committed_result_labels_still_read():
    labels = set()
    for path in sorted(RESULTS.glob("quality-*.json")) + sorted(RESULTS.glob("passkey-*.json")):
        doc = json.loads(path.read_text())
        labels |= {r["label"] for r in doc.get("rows", [])}
        labels |= {p["method"] for p in doc.get("passkey", [])}
    assert len(labels) > 20
    for label in labels:
        assert parse_config(label).label == label


def test_sweeps_replace_the_budget_and_keep_the_rule():
    rec = preset("recommended")
    at = rec.at(density=0.1)
    assert at.selection.budget == rec.selection.budget and at.selection.forced == \
        rec.selection.forced and at.selection.density == 0.1
    assert preset("recommended", block_size=32).block_size == 32
    with pytest.raises(ValueError, match="unknown preset"):
        preset("recomended")
    with pytest.raises(ValueError, match="expected a SparseConfig"):
        resolve_config(0.3)


def test_labels_read_into_the_right_fields():
    for spec in ["dense", "gate@0.3", "gate@t=0.002", "gate+sink@0.1", "oracle-max@0.5",
                 "oracle-sum@t=0.01", "sink_window@0.2", "vertical_slash@0.1", "gate+sink@a=0.3",
                 "oracle-max@a=0.2", "gate+sink+local@a=0.3", "gate+local3@0.2",
                 "gate+sink+local+last@a=0.3", "oracle-max+last2@0.3", "gate+sink+local@r=0.3",
                 "gate+sink+local+floor0.5@a=0.3", "oracle-max+floor0.25@r=0.2"]:
        assert parse_config(spec).label == spec
    c = parse_config("oracle-sum@0.3", block_size=32, attention="flex")
    assert (c.method, c.selection.density, c.block_size, c.attention) == ("oracle-sum", 0.3, 32,
                                                                           "flex")
    assert c.spec.ground_truth == "sum"
    assert parse_config("gate+sink@t=0.01").selection.count("sink") == 1
    s = parse_config("gate+sink@a=0.3").selection
    assert (s.budget, s.density, s.count("sink")) == ("layer", 0.3, 1)
    s = parse_config("gate+sink+local@a=0.3").selection
    assert (s.count("sink"), s.count("local"), s.budget) == (1, 1, "layer")
    assert parse_config("oracle-max+local2@0.3").selection.count("local") == 2
    s = parse_config("gate+sink+local+last@a=0.3").selection
    assert (s.count("sink"), s.count("local"), s.count("last"), s.budget) == (1, 1, 1, "layer")
    assert parse_config("gate+last3@t=0.01").selection.count("last") == 3
    s = parse_config("gate+sink+local@r=0.2").selection
    assert (s.budget, s.density) == ("relative", 0.2)
    assert parse_config("gate+sink@a=0.2").selection.budget == "layer"
    s = parse_config("gate+sink+local+floor0.5@r=0.3").selection
    assert (s.row_floor, s.budget, s.count("local")) == (0.5, "relative", 1)


@pytest.mark.parametrize("spec, match", [("topk@0.3", "unknown method 'topk'"),
                                         ("gate@x", "cannot read 'x'"),
                                         ("sink_window@t=0.1", "density only"),
                                         ("sink_window@a=0.1", "no layer budget"),
                                         ("gate@a=x", "layer budget like a=0.3"),
                                         ("gate@r=x", "layer budget like a=0.3 or r=0.3"),
                                         ("sink_window@r=0.1", "no layer budget"),
                                         ("gate+window@0.3", r"cannot read '\+window'"),
                                         ("gate+lastx@0.3", r"cannot read '\+lastx'"),
                                         ("gate+floor@a=0.3", "a share like"),
                                         ("gate+floor0.5@0.3", "row_floor .* budget='layer'"),
                                         ("gate+floor2@a=0.3", r"row_floor must be in"),
                                         ("oracle-mean@0.3", "unknown method 'oracle-mean'")])
def test_parse_config_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_config(spec)


def test_series_read_back_into_their_sweep():
    from seerlib.names import display_name, series, sweep

    rng = random.Random(1)
    for _ in range(200):
        cfg = _random_config(rng)
        if cfg.selection.threshold is not None:
            continue
        d = cfg.selection.density
        assert sweep(series(cfg), [d], block_size=cfg.block_size) == [cfg], cfg.label
        assert display_name(series(cfg))  # every series has a name
    assert sweep("dense", [0.3, 0.1]) == [SparseConfig("dense")]
    with pytest.raises(ValueError, match="cannot read the rule 'relatve'"):
        sweep("gate+sink relatve", [0.3])



def test_ground_truth_and_oracles_see_the_logit_soft_cap(monkeypatch):
    """The oracles' map is of the soft-capped attention (Gemma2), and the oracles pass the
    layer's soft-cap (LayerInputs.softcap) to it; vertical_slash estimates from capped scores."""
    q, k, v = qkv(S=96, seed=4)
    q, k = q * 4, k * 4
    want = reference.pooled_attention(q, k, v, 16, softcap=1.0)[1]
    torch.testing.assert_close(methods.ground_truth(q, k, v, 16, "max", softcap=1.0), want)
    assert (methods.ground_truth(q, k, v, 16, "max") - want).abs().max() > 1e-2
    seen = []
    real = methods.ground_truth
    monkeypatch.setattr(methods, "ground_truth",
                        lambda *a: seen.append(a[-1]) or real(*a))
    for method in ("oracle-max", "oracle-sum"):
        layer_block_mask(SparseConfig(method, Selection(density=0.3), block_size=16),
                         LayerInputs(q, k, v, 16, softcap=1.0))
    assert seen == [1.0, 1.0]
    cfg = SparseConfig("vertical_slash", Selection(density=0.3), block_size=16)
    got = layer_block_mask(cfg, LayerInputs(q, k, v, 16, softcap=1.0))
    assert torch.equal(got, patterns.vertical_slash(q, k, topk_density(0.3, 6), 16, softcap=1.0))


def test_gate_block_mask_from_pooled_features_is_the_gate_method():
    """The graphed path's split (pool, then `gate_block_mask`) gives the method's own masks, and
    the pooled features are the gate's."""
    from seerlib import ops
    from seerlib.gate import AttnGate

    torch.manual_seed(0)
    gate = AttnGate(4, 2, 16, block_size=16)
    q, k, v = qkv(S=97)
    q_pre, k_pre = q + 0.1, k - 0.1
    sel = Selection(density=0.3)
    layer = LayerInputs(q, k, v, 16, gate=gate, q_pre=q_pre, k_pre=k_pre)
    want = layer_block_mask(SparseConfig("gate", sel, block_size=16), layer)
    qp, kp = gate.pool(q_pre, k_pre)
    assert torch.equal(gate_block_mask(gate, qp, kp, sel), want)
    out = torch.full_like(kp, float("nan"))
    assert ops.pool_blocks(k_pre, 16, gate.k_pool, out=out) is out and torch.equal(out, kp)


@pytest.mark.slow
def test_compiled_gate_scores_and_logits_are_the_eager_ones():
    """`compiled_gate_scores` (pooling included) and `compiled_gate_logits` (inductor's C++
    backend on a CPU) give the eager logits on and below the block diagonal, at a length that is
    not a multiple of the block."""
    from seerlib.gate import AttnGate

    torch.manual_seed(0)
    gate = AttnGate(4, 2, 16, block_size=16)
    q, k, _ = qkv(S=97)
    want = methods.gate_scores(gate, q, k)
    nb = want.shape[-1]
    below = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert want.shape == (1, 4, nb, nb) and nb == 7
    got = methods.compiled_gate_scores()(gate, q, k)
    torch.testing.assert_close(got[..., below], want[..., below], atol=1e-5, rtol=1e-5)
    qp, kp = gate.pool(q, k)
    got = methods.compiled_gate_logits()(gate, qp, kp)
    torch.testing.assert_close(got[..., below], want[..., below], atol=1e-5, rtol=1e-5)
