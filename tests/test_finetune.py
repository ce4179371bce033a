"""seerlib.finetune: fine-tuning with sparsity in the loop, on tiny random Llamas (CPU)."""

import json

import pytest
import torch

from seerlib.distill import tiny_model
from seerlib.finetune import (
    FinetuneConfig,
    FineTuner,
    apply_model_diff,
    base_snapshot,
    main,
    save_model_diff,
)
from seerlib.finetune.cli import run_paths
from seerlib.gate import GateSet
from seerlib.io import load_gates, read_metadata
from seerlib.targets import model_fingerprint
from seerlib.yarn import extend_context

WINDOW = torch.randint(0, 211, (1, 100), generator=torch.Generator().manual_seed(1))


def _tuner(seed=0, **cfg):
    model = tiny_model(seed)
    gates = GateSet.from_config(model.config, block_size=16)
    cfg = {"steps": 1, "warmup": 0, **cfg}
    return FineTuner(model, WINDOW, FinetuneConfig(**cfg), gates=gates)


def _grads(**cfg):
    t = _tuner(train="model", **cfg)
    t._pass(WINDOW, True)
    return {n: p.grad.clone() for n, p in t.model.named_parameters()}


def test_lm_and_gate_loss_decrease_on_a_repeated_batch():
    t = _tuner(steps=6, lr=3e-4, gate_lr=3e-3, train="both", sparse="gate@0.5")
    hist = list(t.steps())
    lm, gl = [m["lm_loss"] for m in hist], [m["gate_loss"] for m in hist]
    assert lm[-1] < 0.95 * lm[0], lm
    assert gl[-1] < 0.7 * gl[0], gl
    assert all(0 < m["density"] < 1 and m["tokens_per_s"] > 0 for m in hist)
    assert len(hist[0]["gate_loss_per_layer"]) == 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grads_through_the_sparse_path_at_density_one_match_dense(checkpointing):
    dense = _grads(attention="dense")
    sparse = _grads(sparse="gate@1.0", gradient_checkpointing=checkpointing)
    for name, g in dense.items():
        torch.testing.assert_close(sparse[name], g, atol=2e-6, rtol=1e-4, msg=name)


def test_grads_reach_qkv_through_the_block_sparse_attention():
    dense, sparse = _grads(attention="dense"), _grads(sparse="gate@0.3")
    for part in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{part}.weight"
        assert sparse[name].abs().max() > 0
        assert not torch.allclose(sparse[name], dense[name])  # other blocks, other gradient


@pytest.mark.parametrize("train", ["model", "gate"])
def test_the_frozen_part_does_not_change(train):
    t = _tuner(steps=2, lr=1e-3, gate_lr=1e-2, train=train)
    model0 = model_fingerprint(t.model)
    gates0 = {k: v.clone() for k, v in t.gates.state_dict().items()}
    list(t.steps())
    gates_same = all(torch.equal(v, t.gates.state_dict()[k]) for k, v in gates0.items())
    assert (model_fingerprint(t.model) == model0) == (train == "gate")
    assert gates_same == (train == "model")
    assert len(t.optimizer.param_groups) == 1


@pytest.mark.parametrize("target", ["exact", "kernel"])
def test_the_gate_target_is_the_soft_capped_attention(target, monkeypatch):
    """On a tiny Gemma2 (cap 1, so that it binds) the gate loss's target is the row-normalized
    max-pooled map of the soft-capped attention (the reference's, from the captured post-RoPE
    Q/K/V), for either source; the plain map differs by far more than the tolerance."""
    import seerlib.finetune.train as train
    from seerlib import reference
    from seerlib.capture import capture_qkv
    from seerlib.metrics import normalize_rows
    from seerlib.tiny import tiny_family

    model = tiny_family("gemma2", num_hidden_layers=2, vocab_size=211, attn_logit_softcapping=1.0,
                        layer_types=["sliding_attention", "full_attention"]).requires_grad_(True)
    ids = WINDOW[:, :96]
    t = capture_qkv(model, ids)[1]
    scale = model.model.layers[1].self_attn.scaling
    want = normalize_rows(reference.pooled_attention(t.q, t.k, t.v, 16, scale=scale,
                                                     softcap=1.0)[1])
    plain = normalize_rows(reference.pooled_attention(t.q, t.k, t.v, 16, scale=scale)[1])
    seen = []
    real = train.kl_div
    monkeypatch.setattr(train, "kl_div", lambda tg, *a, **kw: seen.append(tg) or real(tg, *a, **kw))
    tuner = FineTuner(model, ids, FinetuneConfig(steps=1, warmup=0, train="gate",
                                                 attention="dense", target=target),
                      gates=GateSet.from_config(model.config, block_size=16))
    tuner._pass(ids, True)
    assert len(seen) == 1  # the one global layer
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=1e-5)
    assert (plain - want).abs().max() > 1e-2  # what the test would miss without the cap


def test_the_model_diff_round_trips_and_refuses_another_base(tmp_path):
    t = _tuner(steps=2, lr=1e-3, train="model", attention="dense")
    base, sha = base_snapshot(t.model), model_fingerprint(t.model)
    list(t.steps())
    path = tmp_path / "run.model.safetensors"
    meta = save_model_diff(t.model, base, path, sha, steps=2)
    assert meta["changed_tensors"] == meta["total_tensors"] == len(base) and meta["steps"] == 2
    fresh = tiny_model()
    assert apply_model_diff(fresh, path)["base_model_sha256"] == sha
    for name, p in t.model.named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[name], p), name
    with pytest.raises(ValueError, match="another base model"):
        apply_model_diff(tiny_model(seed=1), path)
    extended = tiny_model()
    extend_context(extended, 2)
    with pytest.raises(ValueError, match="config hash.*YaRN factor"):
        apply_model_diff(extended, path)
    with pytest.raises(FileNotFoundError, match="no model diff"):
        apply_model_diff(tiny_model(), tmp_path / "missing.safetensors")


def test_an_unchanged_tensor_is_left_out_of_the_diff(tmp_path):
    model = tiny_model()
    base = base_snapshot(model)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    meta = save_model_diff(model, base, tmp_path / "d.safetensors", model_fingerprint(model))
    assert meta["changed_tensors"] == 1
    assert meta["changed_params"] == model.model.norm.weight.numel()


TINY = ["--model", "tiny-random-llama", "--seq-len", "64", "--block-size", "16", "--quiet"]


@pytest.mark.parametrize("args, message", [
    (["--attention", "dense", "--sparse", "gate@0.3"], "--attention dense runs"),
    (["--sparse", "nonsense@0.3"], "unknown method"),
    (["--sparse", "dense"], "keeps every block"),
    (["--train", "model"], "fresh gates that never learn"),
    (["--gates", "g.safetensors"], "--block-size is for fresh gates"),
    (["--eval-every", "5"], "--eval-every needs --eval-windows"),
    (["--lr", "0"], "must be a finite number > 0"),
    (["--context", "0", "--seq-len", "8192"], "longer than the model's context 4096"),
    (["--context", "2048"], "not above the model's original 4096"),
    (["--train", "everything"], "invalid choice"),
])
def test_bad_arguments_are_refused(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--out", str(tmp_path / "g.safetensors"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_cli_writes_gates_diff_and_log_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run.safetensors"
    argv = [*TINY, "--context", "8192", "--steps", "3", "--warmup", "0", "--lr", "1e-3",
            "--sparse", "gate@0.5", "--eval-windows", "1", "--out", str(out)]
    assert main(argv) == 0
    gates, diff, log = run_paths(out)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_lm_loss" in rows[-1]
    assert {"lm_loss", "gate_loss", "density", "tokens_per_s"} <= set(rows[0])
    meta = read_metadata(diff)
    assert meta["yarn_factor"] == 2.0 and meta["steps"] == 3 and meta["gates_file"] == str(out)
    model = tiny_model()
    with pytest.raises(ValueError, match="config hash"):
        load_gates(gates, model)  # made for the extended model
    extend_context(model, 2)
    apply_model_diff(model, diff)
    assert load_gates(gates, model).block_size == 16
    assert read_metadata(gates)["model_sha256"] == model_fingerprint(model)
    before = {p: p.read_bytes() for p in (gates, diff, log)}
    with pytest.raises(SystemExit, match="an earlier run is at"):
        main(argv)
    assert {p: p.read_bytes() for p in (gates, diff, log)} == before


@pytest.mark.parametrize("train, attention, written", [
    ("gate", "dense", {"gates", "log"}),
    ("model", "dense", {"diff", "log"}),
])
def test_the_cli_writes_only_what_trained(tmp_path, train, attention, written):
    out = tmp_path / "run.safetensors"
    main([*TINY, "--context", "0", "--steps", "1", "--train", train, "--attention", attention,
          "--out", str(out)])
    paths = dict(zip(("gates", "diff", "log"), run_paths(out), strict=True))
    assert {name for name, p in paths.items() if p.exists()} == written


def test_a_run_can_start_from_an_earlier_runs_model_diff(tmp_path, capsys):
    first, second = tmp_path / "dense.safetensors", tmp_path / "gate.safetensors"
    common = [*TINY, "--context", "8192", "--steps", "1", "--attention", "dense"]
    main([*common, "--train", "model", "--lr", "1e-3", "--out", str(first)])
    diff = run_paths(first)[1]
    main([*common, "--train", "gate", "--model-diff", str(diff), "--out", str(second)])
    model = tiny_model()
    extend_context(model, 2)
    apply_model_diff(model, diff)
    meta = read_metadata(second)
    assert meta["model_diff"] == str(diff) and meta["model_sha256"] == model_fingerprint(model)
    with pytest.raises(SystemExit, match="--model-diff .*config hash"):
        main([*TINY, "--context", "0", "--steps", "1", "--attention", "dense", "--train", "gate",
              "--model-diff", str(diff), "--out", str(tmp_path / "third.safetensors")])
