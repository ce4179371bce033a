"""seerlib.finetune --checkpoint-every / --resume: a run over several calls, on the tiny random
Llama (CPU): it ends as an uninterrupted run does, and a resumed call that would not continue
the same run is refused with nothing changed."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seerlib.distill.cli import tiny_config
from seerlib.finetune import FinetuneConfig, FineTuner, main
from seerlib.finetune.checkpoint import (
    checkpoint_path,
    load_finetune_checkpoint,
    save_finetune_checkpoint,
)
from seerlib.finetune.cli import run_paths
from seerlib.io import read_metadata, tensor_digest

# YaRN-extended, sparse attention through the gate, 3 windows in batches of 2 (so the window
# order wraps into a second epoch), a warm-up step and a cosine schedule, an eval window
RUN = ["--model", "tiny-random-llama", "--seq-len", "64", "--block-size", "16", "--quiet",
       "--context", "8192", "--train-windows", "3", "--batch-size", "2", "--warmup", "1",
       "--lr", "1e-3", "--gate-lr", "1e-2", "--eval-windows", "1", "--eval-every", "2"]


def _interrupt_after(monkeypatch, step: int) -> None:
    """Stop main after `step` steps as a killed call would: no final outputs are written."""
    real = FineTuner.steps

    def steps(self):
        for m in real(self):
            yield m
            if self.step == step:
                raise KeyboardInterrupt

    monkeypatch.setattr(FineTuner, "steps", steps)


def _files(out) -> dict:
    return {p: p.read_bytes() for p in (*run_paths(out), checkpoint_path(out)) if p.exists()}


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _log(out) -> list[dict]:
    """The loss log's rows without their timings (which differ between any two runs)."""
    rows = [json.loads(line) for line in run_paths(out)[2].read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]


def _facts(path) -> dict:
    """What an output file's metadata says of the training (not of the call: date, command)."""
    keys = ("steps", "tokens_seen", "final_lm_loss", "final_eval_lm_loss", "final_loss")
    return {k: read_metadata(path).get(k) for k in keys}


def _run(tmp_path, *args, steps=4, every=2, name="run"):
    out = tmp_path / f"{name}.safetensors"
    assert main([*RUN, "--steps", str(steps), "--checkpoint-every", str(every), *args,
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("train, attention", [("both", "sparse"), ("model", "dense"),
                                              ("gate", "dense")])
def test_k_steps_and_a_resume_equal_one_uninterrupted_run(tmp_path, monkeypatch, train,
                                                          attention):
    """4 steps in one call == a call killed after step 3 (checkpoint at step 2, a log line of
    step 3 past it) + a --resume call: the same gate and model-diff tensors, and a log of 4
    lines with the same losses (step 3's line is not repeated)."""
    args = ["--train", train, "--attention", attention]
    straight = tmp_path / "straight.safetensors"
    assert main([*RUN, *args, "--steps", "4", "--out", str(straight)]) == 0
    out = tmp_path / "split.safetensors"
    argv = [*RUN, *args, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.undo()
    gates, diff, log = run_paths(out)
    assert not gates.exists() and not diff.exists() and len(log.read_text().splitlines()) == 3
    assert main([*argv, "--resume"]) == 0
    written = [p for p in run_paths(straight)[:2] if p.exists()]
    assert len(written) == (2 if train == "both" else 1)
    for mine, want in zip(run_paths(out)[:2], run_paths(straight)[:2], strict=True):
        assert mine.exists() == want.exists()
        if want.exists():
            a, b = _tensors(mine), _tensors(want)
            assert a.keys() == b.keys()
            for k in b:
                assert torch.equal(a[k], b[k]), k
            assert _facts(mine) == _facts(want)
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    assert _log(out) == _log(straight)


def test_resuming_a_finished_run_changes_no_tensor_and_a_longer_one_appends(tmp_path):
    out = _run(tmp_path)
    gates, diff, log = run_paths(out)
    before = {p: (_tensors(p), _facts(p)) for p in (gates, diff)}
    lines = log.read_text().splitlines()
    assert main([*RUN, "--steps", "4", "--checkpoint-every", "2", "--out", str(out),
                 "--resume"]) == 0
    assert log.read_text().splitlines() == lines
    for p, (tensors, facts) in before.items():
        assert all(torch.equal(t, _tensors(p)[k]) for k, t in tensors.items()), p
        assert _facts(p) == facts and facts["final_lm_loss"] is not None
    assert main([*RUN, "--steps", "5", "--checkpoint-every", "2", "--out", str(out),
                 "--resume"]) == 0
    now = log.read_text().splitlines()
    assert now[:4] == lines and [json.loads(x)["step"] for x in now[4:]] == [5]


@pytest.mark.parametrize("change, message", [
    (["--lr", "2e-3"], "--lr was 0.001, now 0.002"),
    (["--seq-len", "32"], "--seq-len was 64, now 32"),
    (["--sparse", "gate@0.3"], "--sparse was 'gate@0.5', now 'gate@0.3'"),
    (["--seed", "1"], "--seed was 0, now 1"),
    (["--train", "gate"], "--train was 'both', now 'gate'"),
    (["--context", "16384"], "--context was 8192, now 16384"),
    (["--steps", "1"], "--steps 1 is below step 4 of the checkpoint"),
])
def test_a_resume_with_other_options_is_refused_naming_them(tmp_path, change, message):
    out = _run(tmp_path)
    before = _files(out)
    with pytest.raises(SystemExit) as e:
        main([*RUN, "--steps", "4", "--checkpoint-every", "2", "--out", str(out), "--resume",
              *change])
    assert message in str(e.value) and "nothing was changed" in str(e.value)
    assert _files(out) == before


def test_a_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(SystemExit, match="no checkpoint at .*start the run without --resume"):
        main([*RUN, "--steps", "2", "--out", str(fresh), "--resume"])
    assert not any(tmp_path.iterdir())
    out = _run(tmp_path, every=0)  # a run without --checkpoint-every: its files, no checkpoint
    before = _files(out)
    assert not checkpoint_path(out).exists()
    with pytest.raises(SystemExit, match="no checkpoint at .*wrote none"):
        main([*RUN, "--steps", "4", "--out", str(out), "--resume"])
    assert _files(out) == before
    with pytest.raises(SystemExit) as e:  # and --resume names no run without --out
        main([*RUN, "--steps", "2", "--resume"])
    assert e.value.code == 2 and "--resume needs --out" in capsys.readouterr().err


def _rewrite(path, edit) -> None:
    """Rewrite a checkpoint with edit(tensors, metadata) applied, its checksum made to fit."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["seerlib"])
    edit(tensors, meta)
    meta["sha256"] = tensor_digest(tensors)
    save_file(tensors, str(path), metadata={"seerlib": json.dumps(meta)})


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


def _reshape_a_weight(path):
    def edit(tensors, meta):
        tensors["model.model.norm.weight"] = tensors["model.model.norm.weight"][:32].clone()
    _rewrite(path, edit)


def _other_format(path):
    _rewrite(path, lambda tensors, meta: meta.update(format="seerlib-gates/1-checkpoint"))


def _reshape_the_optimizer_state(path):
    def edit(tensors, meta):
        for k in [k for k in tensors if k.startswith("optim.0.")]:
            tensors[k] = tensors[k][..., :1].clone() if tensors[k].dim() else tensors[k]
    _rewrite(path, edit)


def _shorten_the_log(path):
    log = path.with_name(path.name.replace(".ckpt.safetensors", ".loss.jsonl"))
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "could not be read.*expected a fine-tuning checkpoint"),
    (_flip_a_byte, "damaged.*checksum"),
    (_reshape_a_weight, r"model.model.norm.weight of shape \(32,\).*has \(64,\)"),
    (_other_format, "not a seerlib fine-tuning checkpoint"),
    (_reshape_the_optimizer_state, r"optimizer state optim.0.exp_avg of shape"),
    (_shorten_the_log, "does not lead to the checkpoint's step 4.*expected 4 lines"),
])
def test_a_damaged_checkpoint_is_refused(tmp_path, damage, message):
    out = _run(tmp_path)
    damage(checkpoint_path(out))
    before = _files(out)
    with pytest.raises(SystemExit, match=message) as e:
        main([*RUN, "--steps", "4", "--checkpoint-every", "2", "--out", str(out), "--resume"])
    assert str(checkpoint_path(out)) in str(e.value) or "loss log" in str(e.value)
    assert _files(out) == before


def test_without_resume_an_earlier_run_is_still_refused(tmp_path):
    out = _run(tmp_path)
    before = _files(out)
    assert len(before) == 4  # gates, model diff, loss log, checkpoint
    with pytest.raises(SystemExit) as e:
        _run(tmp_path)
    msg = str(e.value)
    assert "an earlier run is at" in msg and "pass --resume to continue it" in msg
    assert str(checkpoint_path(out)) in msg
    assert _files(out) == before


def _dropout_tuner(**cfg) -> FineTuner:
    """A tiny Llama with attention dropout, whose masks draw from torch's generator."""
    from transformers import LlamaForCausalLM  # lazy, as in seerlib.distill.tiny_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(attention_dropout=0.5))
    model.config._attn_implementation = "sdpa"
    windows = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(1))
    cfg = {"steps": 4, "warmup": 0, "lr": 1e-3, "train": "model", "attention": "dense", **cfg}
    return FineTuner(model, windows, FinetuneConfig(**cfg))


def test_the_checkpoint_restores_torchs_random_state(tmp_path):
    """With dropout in the loop a tuner restored at step 2 (its generator moved on meanwhile)
    ends as the uninterrupted one does; and a tuner of another config is refused."""
    straight = _dropout_tuner()
    list(straight.steps())
    part = _dropout_tuner()
    for m in part.steps():
        if m["step"] == 2:
            break
    path = tmp_path / "c.safetensors"
    save_finetune_checkpoint(path, part, {}, "sha")
    resumed = _dropout_tuner()
    torch.rand(100)  # the generator is elsewhere now
    assert load_finetune_checkpoint(path, resumed, {}, "sha")["step"] == 2
    list(resumed.steps())
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name
    assert [m["lm_loss"] for m in resumed.history] == [m["lm_loss"] for m in straight.history]
    with pytest.raises(ValueError, match="another FinetuneConfig: lr was 0.001, now 0.002"):
        load_finetune_checkpoint(path, _dropout_tuner(lr=2e-3), {}, "sha")
    with pytest.raises(ValueError, match="another base model"):
        load_finetune_checkpoint(path, _dropout_tuner(), {}, "other sha")
