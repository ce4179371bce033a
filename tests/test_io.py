import pytest
import torch

from seerlib.distill import tiny_config
from seerlib.gate import GateSet
from seerlib.io import (
    config_hash,
    load_checkpoint,
    load_gates,
    read_metadata,
    save_checkpoint,
    save_gates,
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
