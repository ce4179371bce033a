"""The decode gate's step in one launch (seerlib/kernels/decode_gate_select.py, through
`ops.decode_gate_select` and `step_index`) against the torch path (`DecodeGate.query`, the logits,
`select_decode`, `decode_index`) under the Triton interpreter, in float32: GQA 1/3/4, head dims
64/128, rope types default / linear / llama3 / YaRN and no rope, positions before the first full
block and at block edges, every budget mode, generation through it."""

import copy
import os

import pytest
import torch
from transformers import LlamaConfig

from seerlib import ops
from seerlib.decode import DecodeGateSet
from seerlib.decode.kcache import KCompressionCache
from seerlib.decode.select import decode_index, most_blocks, select_decode
from seerlib.select import Selection

kern = pytest.importorskip("seerlib.kernels.decode_gate_select")
ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"  # the kernel's inputs; the torch path runs on the CPU


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def _on_device(gate):
    return copy.deepcopy(gate).to(DEVICE)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 1024},
}


def _gate(Hq, Hkv, d, b, rope="default", seed=0):
    cfg = LlamaConfig(hidden_size=Hq * d, num_attention_heads=Hq, num_key_value_heads=Hkv,
                      head_dim=d, num_hidden_layers=1, max_position_embeddings=4096,
                      rope_parameters=ROPES[rope])
    torch.manual_seed(seed)
    gate = DecodeGateSet(cfg, block_size=b)[0]
    for p in (gate.q_proj, gate.k_proj):
        p.data.normal_(0, 0.2)  # logits of several units: a spread-out ranking
    return gate.requires_grad_(False)


def _torch_path(gate, q_pre, kg, sel, t, nb, K):
    pos = torch.tensor([t])
    logits = torch.matmul(gate.query(q_pre, pos), kg.transpose(-1, -2))[:, :, 0]
    full = torch.full(logits.shape[:2] + (nb,), float("-inf"))
    full[..., :logits.shape[-1]] = logits
    return logits, decode_index(select_decode(full[:, :, None], sel, pos, gate.block_size), K)


@pytest.mark.parametrize("Hq,Hkv,d,b,rope", [
    (4, 4, 64, 16, "default"),   # GQA 1
    (9, 3, 64, 64, "default"),   # SmolLM2's heads
    (8, 2, 128, 32, "yarn"),     # GQA 4, d 128
    (6, 2, 64, 16, "llama3"),
    (4, 1, 64, 16, "linear"),
])
@pytest.mark.parametrize("sel", [Selection(tokens=256), Selection(tokens=256, forced={"sink": 1}),
                                 Selection(density=0.2), Selection(threshold=0.02)],
                         ids=lambda s: s.label())
def test_matches_torch_path(Hq, Hkv, d, b, rope, sel):
    gate = _gate(Hq, Hkv, d, b, rope)
    g = torch.Generator().manual_seed(d + Hq)
    K = most_blocks(sel, b)
    for S in (3, b, 5 * b + 1, 40 * b, 40 * b + 7):
        B, nb, t = 2, -(-S // b), S - 1
        q_pre = torch.randn(B, Hq, 1, d, generator=g)
        cache = KCompressionCache(gate)
        cache.update(torch.randn(B, Hkv, S, d, generator=g))
        kg = cache.keys if cache.keys is not None else torch.zeros(B, Hkv, 0, d)
        logits, (want_i, want_c) = _torch_path(gate, q_pre, kg, sel, t, nb, K)
        kw = ops._select_kernel_args(sel, False, b, "triton")
        dgate, args = _on_device(gate), _dev(q_pre, kg, torch.tensor([t]))
        for per in (None, 32, 64):  # one launch; the logits split over programs, then selected
            idx, cnt, got_logits = kern.decode_gate_select(
                dgate, *args, nb, max_blocks=K, blocks_per_program=per, **kw)
            torch.testing.assert_close(got_logits.cpu(), logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(idx.cpu(), want_i) and torch.equal(cnt.cpu(), want_c), (S, per)
        via_ops = ops.decode_gate_select(dgate, *args[:2], sel, args[2], nb, K, backend="triton")
        assert torch.equal(via_ops[0].cpu(), want_i) and torch.equal(via_ops[1].cpu(), want_c)


@pytest.mark.parametrize("chunk_c,chunk_n,per,warps", [
    (64, 64, None, None), (128, 16, 48, 8), (16, 128, 64, 2), (256, 256, None, 4)])
def test_launch_variants_give_the_same_index(chunk_c, chunk_n, per, warps):
    """The tune's options (chunk sizes, warps, a split that is no multiple of the chunk) change
    how the work is cut, never the logits or the index."""
    gate = _gate(8, 2, 64, 16)
    g = torch.Generator().manual_seed(5)
    S, b = 40 * 16 + 7, 16
    sel = Selection(tokens=256, forced={"sink": 1})
    K, nb = most_blocks(sel, b), -(-S // b)
    q_pre = torch.randn(2, 8, 1, 64, generator=g)
    cache = KCompressionCache(gate)
    cache.update(torch.randn(2, 2, S, 64, generator=g))
    logits, (want_i, want_c) = _torch_path(gate, q_pre, cache.keys, sel, S - 1, nb, K)
    kw = ops._select_kernel_args(sel, False, b, "triton")
    idx, cnt, got = kern.decode_gate_select(
        _on_device(gate), *_dev(q_pre, cache.keys, torch.tensor([S - 1])), nb, max_blocks=K,
        blocks_per_program=per, chunk_c=chunk_c, chunk_n=chunk_n, num_warps=warps, **kw)
    torch.testing.assert_close(got.cpu(), logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx.cpu(), want_i) and torch.equal(cnt.cpu(), want_c)


def test_logit_splits():
    """Whole rows when the rows fill the GPU or are short; else about two programs per
    multiprocessor, whole 32-block chunks of at least 64 blocks."""
    assert kern.logit_splits(128, 512, 132) == 512
    assert kern.logit_splits(8, 100, 132) == 100
    per = kern.logit_splits(8, 2048, 132)
    assert per % 32 == 0 and per >= 64 and -(-2048 // per) * 8 >= 132


def test_rotary_in_kernel_is_the_models():
    """The kernel's cos / sin at a position (from inv_freq and the attention scaling) are the
    rotary module's, for every fused rope type: the logits of a one-block cache agree."""
    for rope in ROPES:
        gate = _gate(4, 2, 64, 16, rope)
        assert kern.fusable(gate)
        q_pre = torch.randn(1, 4, 1, 64)
        kg = torch.randn(1, 2, 300, 64)
        for t in (2800, 3000, 4095):
            want = torch.matmul(gate.query(q_pre, torch.tensor([t])), kg.transpose(-1, -2))
            got = kern.decode_gate_select(_on_device(gate), *_dev(q_pre, kg, torch.tensor([t])),
                                          512, mode="tokens", budget_blocks=4)[2]
            torch.testing.assert_close(got.cpu(), want[:, :, 0], atol=1e-4, rtol=1e-4)


def test_no_rope_and_the_fallback():
    """A gate without rope fuses; one whose rotary is not plain takes the torch path through ops
    (same index), and the kernel itself refuses it."""
    gate = _gate(4, 2, 64, 16)
    gate.rope = None
    q_pre, kg = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 10, 64)
    sel = Selection(tokens=64)
    t, nb = 16 * 10 + 3, 11
    _, want = _torch_path(gate, q_pre, kg, sel, t, nb, 4)
    args = _dev(q_pre, kg)
    got = ops.decode_gate_select(_on_device(gate), *args, sel, *_dev(torch.tensor([t])), nb, 4,
                                 backend="triton")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])

    gate = _gate(4, 2, 64, 16)
    gate.rope.rotary.rope_type = "dynamic"  # inv_freq would change with the length
    assert not kern.fusable(gate)
    _, want = _torch_path(gate, q_pre, kg, sel, t, nb, 4)
    got = ops.decode_gate_select(_on_device(gate), *args, sel, *_dev(torch.tensor([t])), nb, 4,
                                 backend="triton")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    with pytest.raises(ValueError, match="plain rotate-half"):
        kern.decode_gate_select(gate, q_pre, kg, torch.tensor([t]), nb, mode="tokens")


@pytest.mark.parametrize("bad,match", [
    (dict(q_pre=torch.randn(1, 4, 2, 64)), r"q_pre must be \(B, 4, 1, 64\)"),
    (dict(k_gate=torch.randn(1, 3, 5, 64)), r"k_gate must be \(B, Hkv, n, d_gate\)"),
    (dict(num_blocks=4), "at least the cached blocks 5"),
    (dict(position=torch.tensor([3.0])), r"position must be a \(1,\) integer tensor"),
    (dict(mode="best"), "mode must be one of"),
    (dict(chunk_c=48), "chunk_c must be a power of two in 16 .. 256; got 48"),
    (dict(chunk_n=512), "chunk_n must be a power of two"),
    (dict(num_warps=3), "num_warps must be 1, 2, 4, 8 or 16; got 3"),
])
def test_bad_input(bad, match):
    kw = dict(q_pre=torch.randn(1, 4, 1, 64), k_gate=torch.randn(1, 2, 5, 64),
              position=torch.tensor([90]), num_blocks=6, mode="tokens", budget_blocks=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        kern.decode_gate_select(_gate(4, 2, 64, 16), kw.pop("q_pre"), kw.pop("k_gate"),
                                kw.pop("position"), kw.pop("num_blocks"), **kw)
