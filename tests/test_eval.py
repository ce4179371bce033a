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
    parse_config,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
)

# ---------------------------------------------------------------- no model


def test_parse_config_labels_round_trip():
    for spec in ["dense", "gate@0.3", "gate@t=0.002", "gate+sink@0.1", "oracle-max@0.5",
                 "oracle-sum@t=0.01", "sink_window@0.2", "vertical_slash@0.1", "gate+sink@a=0.3",
                 "oracle-max@a=0.2", "gate+sink+local@a=0.3", "gate+local3@0.2",
                 "gate+sink+local+last@a=0.3", "oracle-max+last2@0.3", "gate+sink+local@r=0.3",
                 "gate+sink+local+floor0.5@a=0.3", "oracle-max+floor0.25@r=0.2"]:
        assert parse_config(spec).label == spec
    c = parse_config("oracle-sum@0.3", block_size=32, attention="flex")
    assert (c.mode, c.pooling, c.density, c.block_size, c.attention) == ("oracle", "sum", 0.3, 32,
                                                                         "flex")
    assert parse_config("gate+sink@t=0.01").keep_sink
    c = parse_config("gate+sink@a=0.3")
    assert (c.adaptive, c.density, c.keep_sink) == (True, 0.3, True)
    c = parse_config("gate+sink+local@a=0.3")
    assert (c.keep_sink, c.keep_local, c.adaptive) == (True, 1, True)
    assert parse_config("oracle-max+local2@0.3").keep_local == 2
    c = parse_config("gate+sink+local+last@a=0.3")
    assert (c.keep_sink, c.keep_local, c.dense_last_rows, c.adaptive) == (True, 1, 1, True)
    assert parse_config("gate+last3@t=0.01").dense_last_rows == 3
    c = parse_config("gate+sink+local@r=0.2")
    assert (c.adaptive, c.relative, c.density) == (True, True, 0.2)
    assert not parse_config("gate+sink@a=0.2").relative
    c = parse_config("gate+sink+local+floor0.5@r=0.3")
    assert (c.row_floor, c.relative, c.keep_local) == (0.5, True, 1)


@pytest.mark.parametrize("spec, match", [("topk@0.3", "unknown mode 'topk'"),
                                         ("gate@x", "cannot read 'x'"),
                                         ("sink_window@t=0.1", "density only"),
                                         ("sink_window@a=0.1", "adaptive selection needs"),
                                         ("gate@a=x", "adaptive density like a=0.3"),
                                         ("gate@r=x", "adaptive density like a=0.3 or r=0.3"),
                                         ("sink_window@r=0.1", "adaptive selection needs"),
                                         ("gate+window@0.3", r"cannot read '\+window'"),
                                         ("gate+lastx@0.3", r"cannot read '\+lastx'"),
                                         ("gate+floor@a=0.3", "a share like"),
                                         ("gate+floor0.5@0.3", "row_floor .* adaptive"),
                                         ("gate+floor2@a=0.3", r"row_floor must be in"),
                                         ("oracle-mean@0.3", "pooling must be one of")])
def test_parse_config_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_config(spec)


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
    # a configuration the table has no name for is listed under its own, not left out
    odd = dict(row, label="gate+local2+floor0.25@a=0.3", mode="gate", ppl=9.25)
    md = markdown({"meta": {"command": "python -m seerlib.eval X", "block_size": 64},
                   "rows": [dense, row, thr, *gate, odd],
                   "passkey": [dict(method="dense", length=2048, depth=0.5, correct=True),
                               dict(method="dense", length=2048, depth=0.5, correct=False)]})
    assert "| dense | 8.600 | 8.600 | 8.600 |" in md
    assert "| sink + window | – | 9.500 (0.900, 0.286) | – |" in md
    assert "| gate+local2+floor0.25 adaptive | – | 9.250 (0.900, 0.286) | – |" in md
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
    from seerlib.integrate import topk_density

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
