import json

import pytest
import torch

from seerlib.distill import tiny_config
from seerlib.gate import GateSet
from seerlib.io import (
    FORMAT,
    GateFileError,
    atomic_write,
    atomic_write_text,
    config_hash,
    load_checkpoint,
    load_gates,
    read_metadata,
    save_checkpoint,
    save_gates,
    tensor_digest,
)


def test_round_trip(tmp_path):
    cfg = tiny_config()
    gates = GateSet.from_config(cfg, block_size=32, model_name="tiny")
    meta = save_gates(gates, tmp_path / "g.safetensors", tokens_seen=123, steps=4, final_loss=0.5)
    assert meta["block_size"] == 32 and meta["config_hash"] == config_hash(cfg)
    back = load_gates(tmp_path / "g.safetensors", cfg, block_size=32, model_name="tiny")
    for a, b in zip(gates.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)
    q, k = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16)
    torch.testing.assert_close(back[1](q, k), gates[1](q, k))
    m = read_metadata(tmp_path / "g.safetensors")
    assert m["tokens_seen"] == 123 and m["steps"] == 4 and m["model_name"] == "tiny" and m["date"]
    with open(tmp_path / "g.safetensors", "rb") as f:
        assert b"pickle" not in f.read(200)


def test_fp16_file_is_half_size(tmp_path):
    gates = GateSet.from_config(tiny_config(), block_size=32)
    save_gates(gates, tmp_path / "a.safetensors")
    save_gates(gates, tmp_path / "b.safetensors", dtype=torch.float16)
    a, b = (tmp_path / "a.safetensors").stat().st_size, (tmp_path / "b.safetensors").stat().st_size
    assert b < 0.6 * a
    assert load_gates(tmp_path / "b.safetensors", tiny_config())[0].k_proj.dtype == torch.float32


def test_mismatch_refused(tmp_path):
    gates = GateSet.from_config(tiny_config(), block_size=32, model_name="tiny")
    p = tmp_path / "g.safetensors"
    save_gates(gates, p)
    with pytest.raises(ValueError, match="config hash"):
        load_gates(p, tiny_config(num_key_value_heads=4))
    with pytest.raises(ValueError, match="block size 32; expected 64"):
        load_gates(p, tiny_config(), block_size=64)
    with pytest.raises(ValueError, match="expected 'other'"):
        load_gates(p, tiny_config(), model_name="other")
    with pytest.raises(FileNotFoundError):
        load_gates(tmp_path / "missing.safetensors", tiny_config())


def test_checkpoint_resume(tmp_path):
    torch.manual_seed(0)
    gates = GateSet.from_config(tiny_config(), block_size=32)
    opt = torch.optim.AdamW(gates.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        loss = sum(p.square().sum() for p in gates.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "c.safetensors", gates, opt, sched, {"step": 3})
    g2 = GateSet.from_config(tiny_config(), block_size=32)
    o2 = torch.optim.AdamW(g2.parameters(), lr=1e-2, weight_decay=0.0)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(tmp_path / "c.safetensors", g2, o2, s2)
    assert state == {"step": 3}
    for model, o, s in ((gates, opt, sched), (g2, o2, s2)):
        loss = sum(p.square().sum() for p in model.parameters())
        o.zero_grad()
        loss.backward()
        o.step()
        s.step()
    for a, b in zip(gates.parameters(), g2.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="resume"):
        load_checkpoint(
            tmp_path / "c.safetensors", GateSet.from_config(tiny_config(), block_size=16), o2, s2
        )


SHIPPED_GATES = {  # file: the window length it was trained on
    "data/gates/smollm2-135m-instruct-b64-s8192.safetensors": 8192,  # the recommended one
    "data/gates/smollm2-135m-instruct-b64.safetensors": 2048,
}


@pytest.mark.model
@pytest.mark.parametrize("SHIPPED, seq_len", list(SHIPPED_GATES.items()))
def test_shipped_gate_loads(SHIPPED, seq_len):
    import os

    from seerlib.data import MODEL_NAME, load_model

    if not os.path.exists(SHIPPED):
        pytest.fail(f"{SHIPPED} is missing")
    model, _ = load_model()
    gates = load_gates(SHIPPED, model, block_size=64, model_name=MODEL_NAME)
    meta = read_metadata(SHIPPED)
    assert len(gates) == model.config.num_hidden_layers == 30
    assert meta["steps"] > 0 and meta["tokens_seen"] > 0 and meta["command"]
    assert meta["seq_len"] == seq_len
    assert os.path.getsize(SHIPPED) < 10e6
    q = torch.randn(1, 9, 200, 64)
    k = torch.randn(1, 3, 200, 64)
    assert torch.isfinite(gates[0](q, k).diagonal(dim1=-2, dim2=-1)).all()


# ---------------------------------------------------------------- damaged and dangerous files


def _gates(**kw):
    return GateSet.from_config(tiny_config(), block_size=32, model_name="tiny", **kw)


def _rewrite(path, tensors=None, **meta_changes):
    """Rewrite a gate file as a tamperer would: other tensors and/or metadata, no checks."""
    from safetensors.torch import load_file, save_file

    meta = read_metadata(path)
    meta.update(meta_changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    if tensors is None:  # copies: save_file rewrites the file that load_file's tensors map
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"seerlib": json.dumps(meta)})


def test_save_refuses_non_float_dtype(tmp_path):
    p = tmp_path / "g.safetensors"
    for bad in (torch.int8, torch.bool, torch.int64):
        with pytest.raises(ValueError, match=f"floating-point dtype.*got {bad}"):
            save_gates(_gates(), p, dtype=bad)
    with pytest.raises(ValueError, match="floating-point dtype"):
        save_gates(_gates(), p, dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_flipped_byte_is_refused_naming_the_path(tmp_path):
    p = tmp_path / "g.safetensors"
    meta = save_gates(_gates(), p)
    assert len(meta["sha256"]) == 64
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's bytes
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{p}.*checksum"):
        load_gates(p, tiny_config())


def test_gate_file_carries_train_and_storage_dtype(tmp_path):
    p = tmp_path / "g.safetensors"
    meta = save_gates(_gates(), p, dtype=torch.float16)
    assert meta["train_dtype"] == "float32" and meta["dtype"] == "float16"
    assert read_metadata(p)["train_dtype"] == "float32"
    bf = _gates().to(torch.bfloat16)
    assert save_gates(bf, tmp_path / "bf.safetensors")["train_dtype"] == "bfloat16"
    # tensors stored in another dtype than the header says: refused
    from safetensors.torch import load_file

    as_f32 = {k: v.float() for k, v in load_file(str(p)).items()}  # float(): copies
    _rewrite(p, as_f32, sha256=tensor_digest(as_f32))
    with pytest.raises(ValueError, match=f"{p}.*stored as float32.*says float16"):
        load_gates(p, tiny_config())
    _rewrite(p, as_f32, dtype="float32", train_dtype="int8")
    with pytest.raises(ValueError, match=f"{p}.*trained in 'int8'"):
        load_gates(p, tiny_config())


def test_non_finite_weights_are_refused_on_save_and_load(tmp_path):
    p = tmp_path / "g.safetensors"
    g = _gates()
    with torch.no_grad():
        g[1].k_proj[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*gates\.1\.k_proj"):
        save_gates(g, p)
    assert not p.exists()
    g = _gates()
    with torch.no_grad():
        g[0].k_proj[0, 0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=r"gates\.0\.k_proj.*non-finite.*float16"):
        save_gates(g, p, dtype=torch.float16)
    save_gates(_gates(), p)
    from safetensors.torch import load_file

    bad = {k: v.clone() for k, v in load_file(str(p)).items()}
    name = sorted(bad)[0]
    bad[name][0] = float("nan")
    _rewrite(p, bad, sha256=tensor_digest(bad))  # a consistent checksum: only finiteness fails
    with pytest.raises(ValueError, match=f"{p}.*non-finite.*{name}"):
        load_gates(p, tiny_config())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "bad-json", "no-fields"])
def test_unreadable_gate_file_names_path_and_expectation(tmp_path, damage):
    p = tmp_path / "g.safetensors"
    save_gates(_gates(), p)
    raw = p.read_bytes()
    if damage == "garbage":
        p.write_bytes(b"\x00not a safetensors file at all" * 3)
    elif damage == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "bad-json":
        from safetensors.torch import load_file, save_file

        tensors = {k: v.clone() for k, v in load_file(str(p)).items()}
        save_file(tensors, str(p), metadata={"seerlib": "{not json"})
    else:
        from safetensors.torch import load_file, save_file

        tensors = {k: v.clone() for k, v in load_file(str(p)).items()}
        save_file(tensors, str(p), metadata={"seerlib": json.dumps({"format": FORMAT})})
    with pytest.raises(GateFileError, match=f"{p}.*expected") as e:
        load_gates(p, tiny_config())
    assert isinstance(e.value, ValueError)


def test_older_file_without_checksum_still_loads(tmp_path):
    """The first gate files (data/gates/, committed) carry no checksum and no train dtype."""
    p = tmp_path / "old.safetensors"
    g = _gates()
    save_gates(g, p, dtype=torch.float16)
    _rewrite(p, sha256=None, train_dtype=None)
    assert "sha256" not in read_metadata(p)
    back = load_gates(p, tiny_config())
    torch.testing.assert_close(back[0].k_proj, g[0].k_proj, atol=1e-3, rtol=1e-3)


def test_checkpoint_is_checked(tmp_path):
    g = _gates()
    opt = torch.optim.AdamW(g.parameters(), lr=1e-2)
    sum(p.square().sum() for p in g.parameters()).backward()
    opt.step()
    c = tmp_path / "c.safetensors"
    save_checkpoint(c, g, opt, None, {"step": 1})
    data = bytearray(c.read_bytes())
    data[-5] ^= 0x10
    c.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{c}.*checksum"):
        load_checkpoint(c, _gates(), torch.optim.AdamW(_gates().parameters()), None)
    with torch.no_grad():
        g[0].k_proj[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path / "d.safetensors", g, opt, None, {"step": 1})
    assert not (tmp_path / "d.safetensors").exists()


def test_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"):  # noqa: PT012
        with atomic_write(p) as tmp:
            assert tmp.parent == tmp_path and tmp != p
            tmp.write_bytes(b"half a new fi")
            raise RuntimeError("killed")
    assert p.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [p]
    with pytest.raises(KeyboardInterrupt):  # noqa: PT012
        with atomic_write(p) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(tmp_path.iterdir()) == [p]
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and sorted(tmp_path.iterdir()) == [p]


def test_atomic_write_reaps_temp_files_of_dead_writers(tmp_path):
    import subprocess
    import sys

    from seerlib import io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p = tmp_path / "big.safetensors"
    stale = io._temp_path(p, pid=dead.pid)
    stale.write_bytes(b"\0" * 1000)  # what a killed save leaves
    alive = io._temp_path(p)  # another writer of this process, still writing: kept
    alive.write_bytes(b"")
    assert stale.name.startswith(".") and stale.name.endswith(".tmp")
    save_gates(_gates(), p)
    assert not stale.exists() and alive.exists()
    load_gates(p, tiny_config())


def test_failed_save_keeps_the_old_gate_file(tmp_path, monkeypatch):
    from seerlib import io

    p = tmp_path / "g.safetensors"
    save_gates(_gates(), p, steps=1)
    before = p.read_bytes()

    def dies(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", dies)
    with pytest.raises(OSError, match="disk full"):
        save_gates(_gates(), p, steps=2)
    assert p.read_bytes() == before and sorted(tmp_path.iterdir()) == [p]


def test_gates_of_chosen_layers_only_are_saved_and_load(tmp_path):
    """A file of some layers' gates (the layers SeerAttention applies to) is smaller, loads with
    those layers' weights, and a file missing one of its saved_layers is refused."""
    cfg = tiny_config()
    gates = _gates()
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(torch.randn_like(p))
    full, part = tmp_path / "full.safetensors", tmp_path / "part.safetensors"
    save_gates(gates, full)
    meta = save_gates(gates, part, layers=[1])
    assert meta["saved_layers"] == [1] and part.stat().st_size < full.stat().st_size
    loaded = load_gates(part, cfg, model_name="tiny")
    for a, b in zip(loaded[1].parameters(), gates[1].parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="subset"):
        save_gates(gates, tmp_path / "bad.safetensors", layers=[99])
    lies = tmp_path / "lies.safetensors"
    save_gates(gates, lies, layers=[0])
    _rewrite(lies, saved_layers=[0, 1])  # claims a layer it does not hold
    with pytest.raises(GateFileError, match="saved_layers"):
        load_gates(lies, cfg, model_name="tiny")
