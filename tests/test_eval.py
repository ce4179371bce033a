import json
import math
import re

import pytest
import torch

from seerlib.eval import (
    PasskeyTrial,
    dense_pass,
    load_results,
    main,
    markdown,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
)
from seerlib.methods import parse_config

# ---------------------------------------------------------------- no model


def test_load_results_keeps_one_gate_and_one_source_per_passkey_method(tmp_path):
    def row(label, mode, ppl):
        return dict(label=label, mode=mode, length=4096, ppl=ppl)

    def trial(method, key):
        return dict(method=method, length=2048, depth=0.5, key=key, answer=key, correct=True)

    first = {"meta": {"gates": "a.safetensors"},
             "rows": [row("gate@0.3", "gate", 21.0), row("dense", "dense", 20.0)],
             "passkey": [trial("dense", "11111"), trial("gate@0.3", "22222")]}
    second = {"meta": {"gates": "b.safetensors"},
              "rows": [row("gate@0.5", "gate", 99.0), row("dense", "dense", 99.0),
                       row("sink_window@0.3", "sink_window", 22.0)],
              "passkey": [trial("dense", "33333"), trial("gate+sink@0.3", "44444"),
                          trial("sink_window@0.3", "55555")]}
    paths = [tmp_path / "first.json", tmp_path / "second.json", tmp_path / "missing.json"]
    paths[0].write_text(json.dumps(first))
    paths[1].write_text(json.dumps(second))
    rows, trials, notes = load_results(paths)
    assert {(r["label"], r["ppl"]) for r in rows} == {("gate@0.3", 21.0), ("dense", 20.0),
                                                      ("sink_window@0.3", 22.0)}
    assert {m: [t.key for t in ts] for m, ts in trials.items()} == {
        "dense": ["11111"], "gate@0.3": ["22222"], "sink_window@0.3": ["55555"]}
    assert "gate rows left out" in notes[1] and "No committed results" in notes[2]


def test_markdown_tables():
    row = dict(label="sink_window@0.3", mode="sink_window", pooling=None, density_target=0.3,
               threshold=None, length=4096, windows=2, ppl=9.5, recall=0.9,
               achieved_density=0.286)
    dense = dict(row, label="dense", mode="dense", density_target=None, ppl=8.6, recall=1.0,
                 achieved_density=1.0)
    thr = dict(row, label="gate@t=0.01", mode="gate", density_target=None, threshold=0.01,
               achieved_density=0.3)
    gate = [dict(row, label=f"gate@{d}", mode="gate", density_target=d, achieved_density=a,
                 ppl=p) for d, a, p in [(0.5, 0.48, 9.0), (0.2, 0.18, 10.0)]]
    # every configuration gets a row, named from its label
    odd = dict(row, label="gate+local2+floor0.25@a=0.3", mode="gate", ppl=9.25)
    md = markdown({"meta": {"command": "python -m seerlib.eval X", "block_size": 64},
                   "rows": [dense, row, thr, *gate, odd],
                   "passkey": [dict(method="dense", length=2048, depth=0.5, correct=True),
                               dict(method="dense", length=2048, depth=0.5, correct=False)]})
    assert "| dense | 8.600 | 8.600 | 8.600 |" in md
    assert "| sink + window | – | 9.500 (0.900, 0.286) | – |" in md
    assert ("| gate (learned) + local block ×2, row floor 0.25, adaptive budget | – | "
            "9.250 (0.900, 0.286) | – |") in md
    # threshold row with the top-k perplexity interpolated at its density (0.3 between 0.18 / 0.48)
    assert re.search(r"\| gate \| 4096 \| 0.01 \| 0.300 \| 9.500 \| 0.900 \| 9.600 \|", md)
    assert "| dense | 2048 | 1/2 |" in md and "python -m seerlib.eval X" in md


def test_passkey_accuracy_groups_cells():
    t = [PasskeyTrial(1024, 0.5, "12345", "12345", True),
         PasskeyTrial(1024, 0.5, "22345", "21111", False),
         PasskeyTrial(1024, 1.0, "32345", "32345", True)]
    assert passkey_accuracy(t) == {(1024, 0.5): 0.5, (1024, 1.0): 1.0}


# ---------------------------------------------------------------- tokenizer / model


@pytest.mark.model
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_hides_the_key_at_the_requested_depth(smollm, depth):
    from seerlib.eval import PASSKEY_INTRO, PASSKEY_QUESTION

    tok = smollm[1]
    ids, start, n = passkey_prompt(tok, 700, depth, 48213)
    assert ids.shape == (1, 700)
    assert "The pass key is 48213" in tok.decode(ids[0, start : start + n])
    assert tok.decode(ids[0]).count("48213") == 2  # the needle says it twice, nothing else does
    intro = len(tok(PASSKEY_INTRO, add_special_tokens=False)["input_ids"])
    tail = len(tok(PASSKEY_QUESTION.format(first="4"), add_special_tokens=False)["input_ids"])
    haystack = 700 - intro - tail - n
    assert start - intro == round(depth * haystack)  # haystack tokens before the needle
    assert tok.decode(ids[0, -tail:]).endswith("The pass key is 4")


@pytest.mark.model
def test_passkey_prompt_errors(smollm):
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_prompt(smollm[1], 500, 1.5, 12345)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(smollm[1], 40, 0.5, 12345)


@pytest.mark.model
def test_perplexity_is_the_token_weighted_mean(small):
    from seerlib.data import token_windows

    model, tok = small
    w = token_windows(tok, "eval", 64, n=2)
    r = perplexity(model, w, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=w).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), w[:, 1:],
                                            reduction="none")
    assert r.tokens == 2 * 63 and len(r.per_window) == 2
    assert r.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    assert r.per_window[1] == pytest.approx(math.exp(nll[1].mean().item()), rel=1e-4)


@pytest.mark.model
def test_dense_pass_recall_and_density(small):
    from seerlib.data import token_windows
    from seerlib.select import topk_density

    model, tok = small
    ids = token_windows(tok, "eval", 256, n=1)
    cfgs = [parse_config(s, block_size=16) for s in
            ["dense", "oracle-sum@0.5", "oracle-max@0.5", "sink_window@0.5", "oracle-sum@1"]]
    nll, scores, maps = dense_pass(model, ids, cfgs, block_size=16)
    assert nll.shape == (1, 255) and set(maps) == set(range(len(model.model.layers)))
    assert maps[0]["sum"].shape == (1, 9, 16, 16)
    torch.testing.assert_close(maps[0]["sum"].sum(-1), torch.ones(1, 9, 16))
    rec = {k: torch.tensor(v["recall"]) for k, v in scores.items()}
    # the mass oracle keeps the heaviest blocks: no selection of k blocks per row holds more mass
    assert (rec["oracle-sum@0.5"] >= rec["sink_window@0.5"] - 1e-6).all()
    assert (rec["oracle-sum@0.5"] >= rec["oracle-max@0.5"] - 1e-6).all()
    assert torch.allclose(rec["oracle-sum@1"], torch.ones(len(model.model.layers)))
    dens = {k: v["kept"] / v["causal"] for k, v in scores.items()}
    assert dens["oracle-sum@0.5"] == dens["sink_window@0.5"] == pytest.approx(topk_density(0.5, 16))


def test_dense_pass_scores_the_global_layers_only():
    """A sliding-window layer keeps its window under sparsify: recall and density are of the
    layers that run sparse (Gemma3: the global ones), and no ground truth is built for the rest."""
    from seerlib.tiny import tiny_family

    model = tiny_family("gemma3", num_key_value_heads=1, query_pre_attn_scalar=16)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(3, 101, (1, 128))
    cfgs = [parse_config(s, block_size=16) for s in ["oracle-sum@1", "sink_window@0.5"]]
    _, scores, maps = dense_pass(model, ids, cfgs, block_size=16)
    assert set(maps) == {1}
    assert scores["oracle-sum@1"]["recall"] == [pytest.approx(1.0)]
    assert len(scores["sink_window@0.5"]["recall"]) == 1


def test_dense_pass_maps_are_of_the_soft_capped_attention(monkeypatch):
    """Gemma2 soft-caps its logits: the oracle's maps (both pools) and the layer inputs of every
    selection carry the model's cap, as sparsify's do. The cap is 1 so that it binds on this
    tiny model: dropping it moves the maps by far more than the tolerance."""
    import seerlib.eval.quality as quality
    from seerlib import metrics, reference
    from seerlib.capture import capture_qkv
    from seerlib.tiny import tiny_family

    model = tiny_family("gemma2", num_hidden_layers=2, attn_logit_softcapping=1.0,
                        layer_types=["sliding_attention", "full_attention"])
    ids = torch.randint(3, 101, (1, 128), generator=torch.Generator().manual_seed(0))
    seen = []
    real = quality.layer_block_mask
    monkeypatch.setattr(quality, "layer_block_mask",
                        lambda c, layer: seen.append(layer.softcap) or real(c, layer))
    _, _, maps = dense_pass(model, ids, [parse_config("oracle-sum@0.5", block_size=16)],
                            block_size=16)
    assert set(maps) == {1}
    t = capture_qkv(model, ids)[1]
    scale = model.model.layers[1].self_attn.scaling
    want = {"max": reference.pooled_attention(t.q, t.k, t.v, 16, scale=scale, softcap=1.0)[1],
            "sum": metrics.block_mass(t.q, t.k, 16, scale=scale, softcap=1.0)}
    plain = metrics.block_mass(t.q, t.k, 16, scale=scale)
    for pool, w in want.items():
        torch.testing.assert_close(maps[1][pool], w, atol=1e-6, rtol=1e-5, msg=pool)
    assert (plain - want["sum"]).abs().max() > 1e-2  # what the test would miss without the cap
    assert seen == [1.0]  # the one global layer's selection


@pytest.mark.model
def test_cli_writes_json_and_markdown(smollm, tmp_path):
    out = tmp_path / "q"
    args = ["--out", str(out), "--lengths", "128", "--windows", "1", "--methods", "dense",
            "sink_window", "--densities", "0.5", "--block-size", "16", "--attention", "ops"]
    main(args)
    doc = json.loads(out.with_suffix(".json").read_text())
    labels = {r["label"] for r in doc["rows"]}
    assert labels == {"dense", "sink_window@0.5"}
    sw = next(r for r in doc["rows"] if r["label"] == "sink_window@0.5")
    assert sw["ppl"] > 1 and 0 < sw["recall"] < 1 and sw["windows"] == 1 and sw["length"] == 128
    md = out.with_suffix(".md").read_text()
    assert "| sink + window |" in md and "python -m seerlib.eval --out" in md
    main(["--out", str(out), "--lengths", "128", "--windows", "1", "--methods", "sink_window",
          "--densities", "0.3", "--block-size", "16", "--attention", "ops"])  # merges into it
    labels = {r["label"] for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert labels == {"dense", "sink_window@0.5", "sink_window@0.3"}


# ---------------------------------------------------------------- the CLI's inputs and result files


def _meta(**kw):
    base = dict(model="SmolLM2-135M-Instruct", text="KJV eval split (Isaiah, Luke, Acts)",
                block_size=64, attention="ops", torch="2.13.0+cpu", device="cpu",
                dtype="float32")
    return {**base, **kw}


def _row(label, ppl, length=128):
    density = float(label.split("@")[1]) if "@" in label else None
    return dict(label=label, method=label.split("@")[0], density_target=density, threshold=None,
                length=length, windows=1, ppl=ppl, recall=1.0, achieved_density=density or 1.0)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--lengths", "1"], "--lengths: must be an integer >= 2; got 1"),
        (["--lengths", "0"], "--lengths: must be an integer >= 2"),
        (["--windows", "0"], "--windows: must be an integer >= 1; got 0"),
        (["--densities", "0"], r"--densities: must be a number in \(0, 1\]; got 0"),
        (["--densities", "1.5"], r"--densities: must be a number in \(0, 1\]"),
        (["--densities", "nan"], r"--densities: must be a number in \(0, 1\]"),
        (["--thresholds", "1"], r"--thresholds: must be a number in \[0, 1\); got 1"),
        (["--thresholds", "-0.1"], r"--thresholds: must be a number in \[0, 1\)"),
        (["--offset", "-1"], "--offset: must be an integer >= 0"),
        (["--block-size", "0"], "--block-size: must be an integer >= 1"),
        (["--passkey-depths", "1.5"], r"--passkey-depths: must be a number in \[0, 1\]"),
        (["--passkey-trials", "0"], "--passkey-trials: must be an integer >= 1"),
        (["--threads", "0"], "--threads: must be an integer >= 1"),
    ],
)
def test_cli_refuses_bad_numbers_before_loading_the_model(tmp_path, capsys, monkeypatch, args,
                                                          match):
    from seerlib.eval import cli

    monkeypatch.setattr(cli, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "q"), "--methods", "dense", *args])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_default_out_is_a_fresh_path_not_the_committed_table():
    from seerlib.eval import cli

    out = cli.default_out()
    assert re.fullmatch(r"bench/results/runs/quality-\d{8}-\d{6}Z", out.as_posix())
    assert cli._parser().parse_args([]).out is None


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(block_size=32), "block_size 64 there, 32 here"),
        (dict(gates="b.safetensors"), "gates 'a.safetensors' there, 'b.safetensors' here"),
        (dict(model="Other"), "model 'SmolLM2-135M-Instruct' there, 'Other' here"),
        (dict(dtype="bfloat16"), "dtype 'float32' there, 'bfloat16' here"),
        (dict(device="cuda", gpu="NVIDIA H200"), "device 'cpu' there, 'cuda' here"),
    ],
)
def test_results_merge_only_under_the_same_settings(tmp_path, change, named):
    from seerlib.eval.results import ResultsError, _update_results

    out = tmp_path / "q"
    _update_results(out, _meta(gates="a.safetensors"), "run 1", rows=[_row("dense", 9.0)])
    before = out.with_suffix(".json").read_bytes()
    with pytest.raises(ResultsError, match=re.escape(named)):
        _update_results(out, _meta(**{"gates": "a.safetensors", **change}), "run 2",
                        rows=[_row("dense", 1.0)])
    assert out.with_suffix(".json").read_bytes() == before
    # same settings (a run without a gate file next to one with it included): merged
    _update_results(out, _meta(), "run 3", rows=[_row("sink_window@0.3", 9.5)])
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {r["label"] for r in doc["rows"]} == {"dense", "sink_window@0.3"}
    assert doc["meta"]["gates"] == "a.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["q.json", "q.md"]


def _fake_eval(monkeypatch, between=None):
    """main() without the model: evaluate() hands two finished rows to on_row."""
    from seerlib.distill import tiny_model
    from seerlib.eval import cli

    monkeypatch.setattr(cli, "load_model", lambda **kw: (tiny_model(), None))

    def evaluate(model, tok, configs, lengths, windows, on_row=None, **kw):
        rows = [_row("dense", 8.5), _row("sink_window@0.5", 9.5)]
        on_row(rows[0])
        if between:
            between()
        on_row(rows[1])
        return rows

    monkeypatch.setattr(cli, "evaluate", evaluate)


@pytest.mark.parametrize("damage", [b"{not json", b"", b"[1, 2]", b'{"rows": 3}'])
def test_corrupt_out_is_refused_before_running(tmp_path, monkeypatch, damage):
    from seerlib.eval import cli

    out = tmp_path / "q"
    out.with_suffix(".json").write_bytes(damage)
    monkeypatch.setattr(cli, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=f"{out.with_suffix('.json')}.*nothing was run"):
        main(["--out", str(out), "--lengths", "128", "--methods", "dense"])
    assert out.with_suffix(".json").read_bytes() == damage


def test_out_of_other_settings_is_refused_before_running(tmp_path, monkeypatch):
    from seerlib.eval import cli
    from seerlib.eval.results import _update_results

    out = tmp_path / "q"
    _update_results(out, _meta(block_size=64), "run 1", rows=[_row("dense", 9.0)])
    monkeypatch.setattr(cli, "load_model", lambda **kw: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="block_size 64 there, 16 here.*another --out"):
        main(["--out", str(out), "--lengths", "128", "--methods", "dense", "--block-size", "16"])


def test_a_finished_run_survives_its_out_going_bad_mid_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    damaged = b"{half a file"
    _fake_eval(monkeypatch, between=lambda: out.with_suffix(".json").write_bytes(damaged))
    main(["--out", str(out), "--lengths", "128", "--methods", "dense", "sink_window",
          "--densities", "0.5", "--attention", "ops"])
    assert out.with_suffix(".json").read_bytes() == damaged  # not ours to repair or replace
    (beside,) = [p for p in tmp_path.glob("q-*.json")]
    assert {r["label"] for r in json.loads(beside.read_text())["rows"]} == {
        "dense", "sink_window@0.5"}  # every row of this run, the one written before included
    assert beside.with_suffix(".md").exists()
    err = capsys.readouterr().err
    assert str(beside) in err and str(out.with_suffix(".json")) in err


def test_cli_default_out_writes_a_fresh_file(tmp_path, monkeypatch):
    _fake_eval(monkeypatch)
    monkeypatch.chdir(tmp_path)
    main(["--lengths", "128", "--methods", "dense", "sink_window", "--densities", "0.5",
          "--attention", "ops"])
    (made,) = (tmp_path / "bench" / "results" / "runs").glob("quality-*.json")
    assert {r["label"] for r in json.loads(made.read_text())["rows"]} == {
        "dense", "sink_window@0.5"}
    assert not (tmp_path / "bench" / "results" / "quality-smollm2.json").exists()


def test_load_results_names_a_corrupt_file(tmp_path):
    from seerlib.eval.results import ResultsError

    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ResultsError, match=f"{bad}.*expected"):
        load_results([bad])


def test_merging_into_a_file_with_only_a_command_keeps_its_command(tmp_path):
    """A file written before meta["commands"] existed names its run in meta["command"] alone:
    a merge lists that command and the new one under "Produced by:", not the new one only."""
    from seerlib.eval.results import _update_results

    out = tmp_path / "q"
    meta = {"model": "m", "block_size": 64, "device": "cpu"}
    old = "python -m seerlib.eval --lengths 128 --methods dense"
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": {**meta, "command": old}, "rows": [_row("dense", 8.5)], "passkey": []}))
    new = "python -m seerlib.eval --lengths 256 --methods dense"
    results = _update_results(out, meta, new, rows=[_row("dense", 9.0, 256)])
    assert results["meta"]["commands"] == [old, new]
    assert f"```\n{old}\n{new}\n```" in out.with_suffix(".md").read_text()
