"""seerlib.decode: the decode gate, decode selection, teacher-forced sparsity, generation and the
decode-gate distillation, on the tiny random Llama (CPU)."""

import pytest
import torch

from seerlib import ops, reference
from seerlib.decode import (
    DecodeGateSet,
    decode_index,
    decode_teacher_forced,
    parse_decode_config,
    select_decode,
)
from seerlib.decode.generate import sparse_generation
from seerlib.decode.kcache import KCompressionCache
from seerlib.distill.cli import main as distill_main
from seerlib.distill.cli import tiny_model
from seerlib.distill.decode import DecodeDistiller
from seerlib.distill.train import DistillConfig
from seerlib.eval.decode import decode_configs, decode_quality, markdown
from seerlib.eval.decode import main as decode_eval_main
from seerlib.io import load_gates, save_gates
from seerlib.select import Selection, parse_selection, select_blocks
from seerlib.tiny import tiny_family

B16 = 16


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def gates(model):
    torch.manual_seed(0)
    return DecodeGateSet(model.config, block_size=B16)


# ---------------------------------------------------------------- references


def test_decode_references_agree_with_full_attention():
    torch.manual_seed(0)
    B, Hq, Hkv, S, d, b = 2, 6, 2, 97, 16, 16
    q = torch.randn(B, Hq, S, d, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, S, d, dtype=torch.float64), torch.randn(B, Hkv, S, d,
                                                                      dtype=torch.float64)
    full = reference.attention(q, k, v)
    last = q[:, :, -1:]
    assert torch.allclose(reference.decode_attention(last, k, v), full[:, :, -1:])
    nb = reference.num_blocks(S, b)
    idx = torch.arange(nb, dtype=torch.int32).expand(B, Hkv, nb)
    cnt = torch.full((B, Hkv), nb, dtype=torch.int32)
    assert torch.allclose(reference.sparse_decode_attention(last, k, v, idx, cnt, b),
                          full[:, :, -1:])
    # shorter kv_lens: the same as a shorter cache
    lens = torch.tensor([50, 97])
    short = reference.decode_attention(last[:1], k[:1, :, :50], v[:1, :, :50])
    assert torch.allclose(reference.decode_attention(last, k, v, lens)[:1], short)
    truth = reference.decode_block_truth(q, k, b)
    assert torch.allclose(truth.sum(-1), torch.ones(B, Hkv, S, dtype=torch.float64))
    assert torch.allclose(reference.decode_block_truth(last, k, b)[:, :, 0], truth[:, :, -1])
    rows = torch.tensor([5, 40, 96])
    assert torch.allclose(reference.decode_block_truth(q[:, :, rows], k, b, positions=rows),
                          truth[:, :, rows])
    every = torch.ones(B, Hkv, S, nb, dtype=torch.bool)
    out, mass = reference.row_sparse_attention(q, k, v, every, b, return_mass=True)
    assert torch.allclose(out, full) and torch.allclose(mass, torch.ones_like(mass))
    # pooling="mass": each block's share of the attention, averaged over the group's heads
    p = torch.softmax((q @ k.repeat_interleave(3, 1).transpose(-1, -2)) / d ** 0.5
                      + torch.full((S, S), float("-inf"), dtype=q.dtype).triu(1), -1)
    p = torch.nn.functional.pad(p, (0, nb * b - S)).view(B, Hkv, 3, S, nb, b)
    want = p.sum(-1).mean(2)
    assert torch.allclose(reference.decode_block_truth(q, k, b, pooling="mass"), want)
    with pytest.raises(ValueError, match="pooling must be 'max' or 'mass'"):
        reference.decode_block_truth(q, k, b, pooling="sum")


@pytest.mark.parametrize("cap", [2.0, 50.0])
def test_decode_references_take_the_soft_cap(cap):
    """Decode steps, their sparse form and the teacher-forced rows soft-cap the logits as the
    prefill reference does: over every block they equal its soft-capped attention."""
    torch.manual_seed(0)
    B, Hq, Hkv, S, d, b = 2, 6, 2, 97, 16, 16
    q = torch.randn(B, Hq, S, d, dtype=torch.float64) * 3  # logits of a few units: the cap binds
    k, v = torch.randn(B, Hkv, S, d, dtype=torch.float64), torch.randn(B, Hkv, S, d,
                                                                      dtype=torch.float64)
    full = reference.attention(q, k, v, softcap=cap)
    assert (full - reference.attention(q, k, v)).abs().max() > 1e-2
    last, nb = q[:, :, -1:], reference.num_blocks(S, b)
    idx = torch.arange(nb, dtype=torch.int32).expand(B, Hkv, nb)
    cnt = torch.full((B, Hkv), nb, dtype=torch.int32)
    torch.testing.assert_close(reference.decode_attention(last, k, v, softcap=cap),
                               full[:, :, -1:])
    for backend in ("reference", "auto"):
        torch.testing.assert_close(ops.sparse_decode_attention(
            last, k, v, idx, cnt, b, softcap=cap, backend=backend), full[:, :, -1:])
        torch.testing.assert_close(ops.decode_attention(last, k, v, softcap=cap,
                                                        backend=backend), full[:, :, -1:])
    every = torch.ones(B, Hkv, S, nb, dtype=torch.bool)
    out, mass = reference.row_sparse_attention(q, k, v, every, b, return_mass=True, softcap=cap)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(mass, torch.ones_like(mass))
    # a sparse row: the teacher-forced row and the decode step read the same blocks alike
    keep = torch.zeros(B, Hkv, S, nb, dtype=torch.bool)
    keep[..., [0, 3, nb - 1]] = True
    sparse_idx = torch.tensor([0, 3, nb - 1], dtype=torch.int32).expand(B, Hkv, 3)
    rows = reference.row_sparse_attention(q, k, v, keep, b, softcap=cap)
    torch.testing.assert_close(reference.sparse_decode_attention(
        last, k, v, sparse_idx, torch.full((B, Hkv), 3), b, softcap=cap), rows[:, :, -1:])


def test_sparse_decode_ignores_padding_and_poison_outside_the_selection():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    idx = torch.tensor([[[0, 2, 99, -5], [1, 3, 7, 7]]], dtype=torch.int32)
    cnt = torch.tensor([[2, 2]], dtype=torch.int32)
    ref = reference.sparse_decode_attention(q, k, v, idx, cnt, 16)
    k2, v2 = k.clone(), v.clone()
    k2[:, 0, 16:32] = float("nan")  # block 1 of head 0: not read
    v2[:, 1, 0:16] = float("nan")
    assert torch.equal(reference.sparse_decode_attention(q, k2, v2, idx, cnt, 16), ref)
    with pytest.raises(ValueError, match="one decode query"):
        reference.decode_attention(torch.randn(1, 4, 2, 8), k, v)
    with pytest.raises(ValueError, match="kv_lens must lie"):
        reference.decode_attention(q, k, v, torch.tensor([0]))


def test_ops_decode_pooled_attention_reference_path():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    out, truth = ops.decode_pooled_attention(q, k, v, 16)
    assert torch.allclose(out, reference.attention(q, k, v))
    assert torch.allclose(truth, reference.decode_block_truth(q, k, 16))


# ---------------------------------------------------------------- selection


def test_token_budget_labels_and_refusals():
    sel = parse_selection("+sink@tok=256")
    assert sel.tokens == 256 and sel.label() == "+sink@tok=256"
    with pytest.raises(ValueError, match="one budget"):
        Selection(density=0.3, tokens=64)
    with pytest.raises(ValueError, match="whole number"):
        Selection(tokens=0)
    with pytest.raises(ValueError, match="decode budget"):
        select_blocks(torch.zeros(1, 1, 4, 4), sel)
    with pytest.raises(ValueError, match="does not honour"):
        parse_decode_config("gate+last@tok=256")
    with pytest.raises(ValueError, match="does not honour"):
        parse_decode_config("quest+floor0.5@r=0.3")
    with pytest.raises(ValueError, match="unknown decode method"):
        parse_decode_config("vertical_slash@tok=256")
    assert parse_decode_config("sink_window+local2@tok=512").label == "sink_window+local2@tok=512"


def test_select_decode_budget_forced_and_dense_when_covered():
    torch.manual_seed(3)
    b, S = 16, 100
    nb = reference.num_blocks(S, b)
    scores = torch.randn(2, 3, S, nb)
    pos = torch.arange(S)
    keep = select_decode(scores, Selection(tokens=48, forced={"sink": 1}), pos, b)
    own = pos // b
    assert not (keep & (torch.arange(nb)[None] > own[:, None])).any()  # never past its own
    assert keep[:, :, pos, own].all() and keep[..., 0].all()  # own block and sink
    assert (keep.sum(-1) == torch.clamp(own + 1, max=3)).all()  # 48 // 16 blocks
    every = select_decode(scores, Selection(tokens=10_000), pos, b)
    want = torch.arange(nb)[None, :] <= own[:, None]  # (S, nb)
    assert torch.equal(every, want.expand_as(every))
    idx, cnt = decode_index(keep[:, :, -1], max_blocks=3)
    assert torch.equal(reference.decode_index_to_mask(idx, cnt, nb), keep[:, :, -1])


def test_kcompression_cache_matches_the_gate_keys(model, gates):
    g = gates[0]
    torch.manual_seed(4)
    k_pre = torch.randn(2, g.num_kv_heads, 70, g.head_dim)
    cache = KCompressionCache(g)
    cache.update(k_pre[:, :, :37])
    for t in range(37, 70):
        cache.update(k_pre[:, :, t : t + 1])
    want = g.keys(g.pool(k_pre[:, :, :64]))
    assert cache.tokens == 70 and cache.n_full == 4
    assert torch.allclose(cache.keys, want, atol=1e-6)


# ---------------------------------------------------------------- teacher forcing = generation


@pytest.mark.parametrize("label", ["gate@tok=32", "quest@tok=48", "sink_window@tok=32",
                                   "oracle+sink@tok=32", "gate+local@t=0.05"])
def test_generation_logits_equal_teacher_forced_decode(model, gates, label):
    torch.manual_seed(5)
    ids = torch.randint(0, 211, (2, 70))
    cfg = parse_decode_config(label, B16)
    g = gates if cfg.spec.needs_gate else None
    with torch.no_grad(), sparse_generation(model, cfg, decode_gates=g) as sg:
        res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    steps = torch.stack(res.scores, 1)  # (B, n, vocab)
    with torch.no_grad(), decode_teacher_forced(model, cfg, g, prefix=70):
        tf = model(res.sequences, use_cache=False).logits
    n = steps.shape[1]
    assert torch.allclose(tf[:, 69:69 + n], steps, atol=1e-4)
    assert sg.stats.steps > 0 and (cfg.selection.tokens is None or sg.stats.kept_share < 1)


def test_a_budget_covering_the_context_decodes_as_dense(model, gates):
    torch.manual_seed(6)
    ids = torch.randint(0, 211, (2, 50))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with sparse_generation(model, "gate@tok=4096", decode_gates=gates, block_size=B16) as sg:
            sparse = model.generate(ids, **kw)
    assert torch.equal(dense, sparse) and sg.stats.kept_share == 1.0


def _gemma2(cap, layer_types=("full_attention",) * 3):
    """A tiny random Gemma2 with logit soft-cap `cap` and these layer types."""
    return tiny_family("gemma2", attn_logit_softcapping=cap, layer_types=list(layer_types),
                       num_hidden_layers=len(layer_types))


@pytest.mark.parametrize("label", ["oracle@tok=4096", "gate@tok=4096", "quest@tok=4096"])
def test_gemma2_decode_carries_the_soft_cap(label, monkeypatch):
    """On a tiny Gemma2 whose cap (1) binds, a budget covering the context decodes as dense:
    the same tokens and step logits, and teacher-forced the same logits; every decode method
    is handed the cap. Without it the logits move by far more than the tolerance."""
    import seerlib.decode.generate as generate
    import seerlib.decode.teacher as teacher

    model = _gemma2(1.0)
    ids = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    cfg = parse_decode_config(label, B16)
    gates = DecodeGateSet(model.config, block_size=B16) if cfg.spec.needs_gate else None
    seen = []
    for mod, name in ((generate, "step_index"), (teacher, "decode_scores")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda c, inputs, *a, real=real:
                            seen.append(inputs.softcap) or real(c, inputs, *a))
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with sparse_generation(model, cfg, decode_gates=gates) as sg:
            sparse = model.generate(ids, **kw)
        full = model(dense.sequences, use_cache=False).logits
        with decode_teacher_forced(model, cfg, gates):
            tf = model(dense.sequences, use_cache=False).logits
    assert torch.equal(sparse.sequences, dense.sequences) and sg.stats.kept_share == 1.0
    torch.testing.assert_close(torch.stack(sparse.scores, 1), torch.stack(dense.scores, 1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tf, full, atol=1e-5, rtol=1e-5)
    assert seen and set(seen) == {1.0}
    with torch.no_grad():
        uncapped = _gemma2(None)(dense.sequences, use_cache=False).logits
    assert (uncapped - full).abs().max() > 1e-2  # what the test would miss without the cap


@pytest.mark.parametrize("label", ["oracle@tok=4096", "gate@tok=4096"])
def test_gemma2_sliding_layers_keep_their_window_at_decode(label):
    """A hybrid Gemma2 (sliding, global, sliding; window 32 < the 40-token prompt, cap 1): the
    sliding layers keep the model's own windowed attention at the prefill and every step, as
    under sparsify, so a covering budget decodes as dense, generated and teacher-forced; only
    the global layer's steps are sparse decode steps."""
    model = _gemma2(1.0, ("sliding_attention", "full_attention", "sliding_attention"))
    ids = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    cfg = parse_decode_config(label, B16)
    gates = DecodeGateSet(model.config, block_size=B16) if cfg.spec.needs_gate else None
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with sparse_generation(model, cfg, decode_gates=gates) as sg:
            sparse = model.generate(ids, **kw)
        full = model(dense.sequences, use_cache=False).logits
        with decode_teacher_forced(model, cfg, gates) as tf:
            forced = model(dense.sequences, use_cache=False).logits
    assert torch.equal(sparse.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(sparse.scores, 1), torch.stack(dense.scores, 1),
                               atol=1e-5, rtol=1e-5)
    assert sg.stats.steps == 9 and sg.stats.kept_share == 1.0  # the global layer's steps
    torch.testing.assert_close(forced, full, atol=1e-5, rtol=1e-5)
    assert list(tf.stats.per_layer_recall) == [1]


def test_generation_refuses_missing_or_foreign_gates(model, gates):
    with pytest.raises(ValueError, match="DecodeGateSet"):
        sparse_generation(model, "gate@tok=64", block_size=B16)
    with pytest.raises(ValueError, match="block size"):
        sparse_generation(model, "gate@tok=64", decode_gates=gates, block_size=32)
    with pytest.raises(ValueError, match="reads no gate"):
        sparse_generation(model, "quest@tok=64", decode_gates=gates)


# ---------------------------------------------------------------- files, training, evaluation


def test_decode_gate_files_carry_their_phase(model, gates, tmp_path):
    path = tmp_path / "dec.safetensors"
    meta = save_gates(gates, path)
    assert meta["phase"] == "decode"
    back = load_gates(path, model, phase="decode")
    assert isinstance(back, DecodeGateSet)
    for a, b in zip(back.state_dict().values(), gates.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds decode gates; expected prefill"):
        load_gates(path, model, phase="prefill")


def test_decode_distillation_lowers_the_loss(model):
    torch.manual_seed(7)
    g = DecodeGateSet(model.config, block_size=B16)
    # text with structure: a repeated random sequence, so attention has something to find
    base = torch.randint(0, 211, (1, 64))
    w = torch.cat([base.repeat(1, 4) for _ in range(4)])
    cfg = DistillConfig(block_size=B16, steps=30, batch_size=2, lr=1e-2, warmup=2,
                        recall_tokens=(32,))
    d = DecodeDistiller(g, cfg=cfg, model=model, windows=w, rows=64)
    losses = [m["loss"] for m in d.steps()]
    assert losses[-1] < losses[0]


def test_distill_cli_decode_phase(tmp_path):
    out = tmp_path / "g.safetensors"
    args = ["--model", "tiny-random-llama", "--phase", "decode", "--seq-len", "128",
            "--block-size", "16", "--train-windows", "4", "--steps", "3", "--batch-size", "2",
            "--rows", "16", "--out", str(out), "--quiet"]
    assert distill_main(args) == 0
    assert isinstance(load_gates(out, tiny_model(), phase="decode"), DecodeGateSet)
    with pytest.raises(SystemExit):
        distill_main(args + ["--q-pool", "avg"])


def test_the_mass_target_trains_and_is_recorded(model, tmp_path, capsys):
    """--decode-target mass: the captured target is decode_block_truth's mass pooling, the run
    lowers its loss, the file records it, and what cannot compute it is refused by name."""
    from seerlib.io import read_metadata
    from seerlib.targets import capture_decode_targets

    torch.manual_seed(7)
    ids = torch.randint(0, 211, (1, 64))
    rows = torch.tensor([20, 40, 63])
    got = capture_decode_targets(model, ids, B16, rows, "exact", pooling="mass")
    qk = {}
    from seerlib.capture import attention_override

    def keep(module, query, key, value, attention_mask, *, default, **kw):
        qk[module.layer_idx] = (query, key, kw.get("scaling"))
        return default(module, query, key, value, attention_mask, **kw)

    with torch.no_grad(), attention_override(model, keep):
        model(input_ids=ids, use_cache=False)
    for i, (q, k, sc) in qk.items():
        want = reference.decode_block_truth(q[:, :, rows], k, B16, sc, positions=rows,
                                            pooling="mass")
        assert torch.allclose(got[i][2], want.float())
    with pytest.raises(ValueError, match="exact reference only"):
        capture_decode_targets(model, ids, B16, rows, "kernel", pooling="mass")

    base = torch.randint(0, 211, (1, 64))
    w = torch.cat([base.repeat(1, 4) for _ in range(4)])
    cfg = DistillConfig(block_size=B16, steps=30, batch_size=2, lr=1e-2, warmup=2,
                        recall_tokens=(32,))
    d = DecodeDistiller(DecodeGateSet(model.config, block_size=B16), cfg=cfg, model=model,
                        windows=w, rows=64, pooling="mass")
    losses = [m["loss"] for m in d.steps()]
    assert d.target == "exact" and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="pooling must be 'max', or 'mass' with target"):
        DecodeDistiller(DecodeGateSet(model.config, block_size=B16), cfg=cfg, model=model,
                        windows=w, rows=64, pooling="mass", target="kernel")._check_data()

    out = tmp_path / "m.safetensors"
    args = ["--model", "tiny-random-llama", "--phase", "decode", "--seq-len", "128",
            "--block-size", "16", "--train-windows", "4", "--steps", "4", "--batch-size", "2",
            "--rows", "16", "--out", str(out), "--quiet", "--checkpoint-every", "2"]
    assert distill_main(args + ["--decode-target", "mass"]) == 0
    meta = read_metadata(out)
    assert meta["decode_target"] == "mass" and meta["target"] == "exact"
    other = tmp_path / "x.safetensors"
    refused = [(["--phase", "decode", "--decode-target", "mass", "--target", "kernel"],
                "--target exact"),
               (["--phase", "prefill", "--decode-target", "mass"], "decode-phase option")]
    for extra, match in refused:
        with pytest.raises(SystemExit):
            distill_main(["--model", "tiny-random-llama", "--seq-len", "128", "--block-size",
                          "16", "--steps", "1", "--out", str(other), "--quiet", *extra])
        assert match in capsys.readouterr().err
    assert not other.exists()


def test_a_decode_checkpoint_resumes_only_with_its_target(model, tmp_path):
    torch.manual_seed(3)
    w = torch.randint(0, 211, (4, 64))
    cfg = DistillConfig(block_size=B16, steps=4, batch_size=2, lr=1e-2, warmup=1)
    d = DecodeDistiller(DecodeGateSet(model.config, block_size=B16), cfg=cfg, model=model,
                        windows=w, rows=16, pooling="mass")
    for m in d.steps():
        if m["step"] == 2:
            d.save_checkpoint(tmp_path / "c.safetensors")
            break
    again = DecodeDistiller(DecodeGateSet(model.config, block_size=B16), cfg=cfg, model=model,
                            windows=w, rows=16, pooling="max", target="exact")
    with pytest.raises(ValueError, match="pooling 'mass' \\(now 'max'\\)"):
        again.load_checkpoint(tmp_path / "c.safetensors")


def test_the_mass_oracle_reads_the_most_attention_mass(model, gates):
    """oracle_mass's top-k is the selection of highest mean recall: at the same budget it reads
    at least the mass the max-pooled oracle and the gate read, on every layer."""
    torch.manual_seed(8)
    w = torch.randint(0, 211, (1, 128))
    rows = {r["label"]: r for r in decode_quality(
        model, w, decode_configs(["gate", "oracle", "oracle_mass"], [32], B16), gates,
        progress=False)}
    best = rows["oracle_mass@tok=32"]["per_layer_recall"]
    for other in ("oracle@tok=32", "gate@tok=32"):
        for layer, r in rows[other]["per_layer_recall"].items():
            assert best[layer] >= r - 1e-6, (other, layer)
    assert rows["oracle_mass@tok=32"]["recall"] > rows["gate@tok=32"]["recall"]


def test_decode_quality_rows(model, gates):
    torch.manual_seed(8)
    w = torch.randint(0, 211, (1, 128))
    rows = decode_quality(model, w, decode_configs(["gate", "oracle"], [32, 4096], B16), gates,
                          progress=False)
    by = {r["label"]: r for r in rows}
    assert by["dense"]["recall"] == 1.0
    assert by["oracle@tok=4096"]["recall"] == pytest.approx(1.0)
    assert by["oracle@tok=4096"]["ppl"] == pytest.approx(by["dense"]["ppl"], rel=1e-4)
    assert by["oracle@tok=32"]["recall"] < 1.0
    assert "| gate |" in markdown({"quality": rows})
    # recall per layer: every layer of the model, their mean the row's recall; none for dense
    per = by["gate@tok=32"]["per_layer_recall"]
    assert sorted(per) == [str(i) for i in range(model.config.num_hidden_layers)]
    assert sum(per.values()) / len(per) == pytest.approx(by["gate@tok=32"]["recall"])
    assert all(0 < r <= 1 for r in per.values()) and by["dense"]["per_layer_recall"] == {}
    # the tail of recall lies under its mean, and at the whole budget it is 1 too
    assert 0 < by["gate@tok=32"]["recall_p10"] < by["gate@tok=32"]["recall"]
    assert by["oracle@tok=4096"]["recall_p10"] == pytest.approx(1.0)


def test_quality_table_keeps_forced_block_variants_apart():
    """gate and gate+sink@tok=N are two rows of the table, not one row keyed by the method."""
    rows = [dict(label="dense", method="dense", tokens=None, length=64, ppl=2.0, ppl_late=2.0,
                 recall=1.0)]
    rows += [dict(label=f"gate{f}@tok=32", method="gate", tokens=32, length=64, ppl=p,
                  ppl_late=p, recall=0.5) for f, p in (("", 3.25), ("+sink", 2.75))]
    md = markdown({"quality": rows})
    assert "| gate | 3.250 / 0.500 |" in md and "| gate+sink | 2.750 / 0.500 |" in md


@pytest.mark.parametrize("methods, expected", [
    ("quest,gate+sink+local8", "'gate+sink+local8@tok=1024' needs --gates"),
    ("bogus", "bogus"),
])
def test_decode_eval_cli_refuses_before_loading_the_model(methods, expected, tmp_path, capsys):
    """A gate variant without --gates, or an unknown method, stops before the model loads."""
    with pytest.raises(SystemExit) as e:
        decode_eval_main(["--methods", methods, "--budgets", "1024", "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

