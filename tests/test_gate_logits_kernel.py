"""The prefill gate's logits in one launch (`seerlib.kernels.gate_logits`, through
`ops.gate_logits`) against `AttnGate.forward_pooled` under the Triton interpreter, in float32 (on
CUDA when there is a GPU): GQA 1/3/4, head dims 64/128, lengths 97 and 1025, with and without a
Q linear and a rotary (default, YaRN), tiles of every size, poisoned output memory, the top-k it
feeds, and the refusals."""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from seerlib import ops  # noqa: E402
from seerlib.gate import AttnGate, BlockRoPE, pool_blocks  # noqa: E402
from seerlib.kernels import gate_logits as kern  # noqa: E402
from seerlib.reference import causal_block_mask  # noqa: E402

ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 1024},
}


def _gate(Hq, Hkv, d, b, rope="default", q_pool=("avg",), d_gate=None, q_linear=None, seed=0):
    dg = d if d_gate is None else d_gate
    rot = None
    if rope is not None:
        cfg = LlamaConfig(hidden_size=Hq * d, num_attention_heads=Hq, num_key_value_heads=Hkv,
                          head_dim=d, num_hidden_layers=1, max_position_embeddings=4096,
                          rope_parameters=ROPES[rope])
        rot = BlockRoPE(cfg, dg)
    torch.manual_seed(seed)
    gate = AttnGate(Hq, Hkv, d, block_size=b, rope=rot, q_pool=q_pool, d_gate=d_gate,
                    q_linear=q_linear)
    for p in gate.parameters():
        p.data.normal_(0, 0.2)  # logits of several units
    return gate.requires_grad_(False).to(DEVICE)


def _pooled(gate, B, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, gate.num_heads, S, gate.head_dim, generator=g)
    k = torch.randn(B, gate.num_kv_heads, S, gate.head_dim, generator=g)
    b = gate.block_size
    return (pool_blocks(q, b, gate.q_pool).to(DEVICE), pool_blocks(k, b, gate.k_pool).to(DEVICE))


def _check(gate, qp, kp, **kw):
    want = gate.forward_pooled(qp, kp)
    got = kern.gate_logits(gate, qp, kp, **kw)
    nb = want.shape[-1]
    below = causal_block_mask(nb, want.device)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got[..., below], want[..., below], atol=2e-5, rtol=2e-5)
    return got


@pytest.mark.parametrize("Hq, Hkv, d", [(4, 4, 64), (6, 2, 64), (8, 2, 128)])
@pytest.mark.parametrize("S", [97, 1025])
def test_equals_the_gate_at_awkward_lengths_and_gqa(Hq, Hkv, d, S):
    gate = _gate(Hq, Hkv, d, 16)
    _check(gate, *_pooled(gate, 2, S))


@pytest.mark.parametrize("rope, q_pool, d_gate, q_linear", [
    (None, ("avg",), None, None),              # no rotary, the pooled q is the gate query
    ("yarn", ("avg",), None, None),            # YaRN's attention scaling on cos / sin
    ("default", ("avg", "max"), 32, None),     # a Q linear from two poolings, d_gate < d
    ("default", ("avg",), None, True),         # a forced Q linear at d_gate == d
    ("default", ("max", "avg"), 128, True),    # d_gate > d
])
def test_equals_the_gate_for_each_gate_shape(rope, q_pool, d_gate, q_linear):
    gate = _gate(6, 3, 64, 16, rope=rope, q_pool=q_pool, d_gate=d_gate, q_linear=q_linear)
    assert (gate.q_proj is not None) == (q_linear or len(q_pool) > 1 or d_gate is not None)
    _check(gate, *_pooled(gate, 1, 300))


@pytest.mark.parametrize("block_m, block_n, chunk", [(16, 16, 16), (16, 64, 32), (128, 32, 64),
                                                     (32, 128, 128)])
def test_every_tile_shape_gives_the_same_logits(block_m, block_n, chunk):
    """Tiles that split the diagonal, cross it, or hold every block; a chunk past the inputs."""
    gate = _gate(4, 2, 64, 32)
    _check(gate, *_pooled(gate, 1, 1025), block_m=block_m, block_n=block_n, chunk=chunk)


def test_the_block_size_sets_the_rotary_positions():
    """Block 64: a key block j sits at token 64 j, as the gate's BlockRoPE puts it."""
    gate = _gate(4, 2, 64, 64)
    _check(gate, *_pooled(gate, 1, 2000))


def test_only_entries_on_and_below_the_diagonal_are_read_by_the_selection():
    """The kernel leaves the tiles above the diagonal unwritten: the top-k index built from its
    logits equals the one from the gate's own (-inf filled) logits."""
    gate = _gate(6, 3, 64, 16)
    qp, kp = _pooled(gate, 1, 1025)
    got = _check(gate, qp, kp)
    from seerlib.select import Selection, select_blocks

    sel = Selection(density=0.2)
    want = select_blocks(gate.forward_pooled(qp, kp), sel)
    assert torch.equal(select_blocks(got, sel), want)


def test_ops_takes_the_kernel_or_the_gates_own_path():
    gate = _gate(4, 2, 64, 16)
    qp, kp = _pooled(gate, 1, 97)
    below = causal_block_mask(qp.shape[2], qp.device)
    want = gate.block_scores(qp, kp)
    for backend in ("triton", "reference", "auto"):
        got = ops.gate_logits(gate, qp, kp, backend=backend)
        torch.testing.assert_close(got[..., below].float(), want[..., below].float(), atol=2e-5,
                                   rtol=2e-5)


def test_unsupported_gates_and_bad_inputs_are_named():
    gate = _gate(4, 2, 64, 16)
    qp, kp = _pooled(gate, 1, 97)
    with pytest.raises(ValueError, match="q_pooled must be"):
        kern.gate_logits(gate, qp[:, :2], kp)
    with pytest.raises(ValueError, match="k_pooled must be"):
        kern.gate_logits(gate, qp, kp[..., :64])
    with pytest.raises(ValueError, match="4-D"):
        kern.gate_logits(gate, qp[0], kp)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        kern.gate_logits(gate, qp, kp, block_m=48)
    narrow = _gate(4, 2, 64, 16, q_pool=("avg", "max"), d_gate=16)
    assert not kern.supported(narrow)
    with pytest.raises(ValueError, match="see supported"):
        kern.gate_logits(narrow, *_pooled(narrow, 1, 97))
    # ops, on any backend, takes an unsupported gate's own torch path
    qn, kn = _pooled(narrow, 1, 97)
    below = causal_block_mask(qn.shape[2], qn.device)
    for backend in ("triton", "auto"):
        torch.testing.assert_close(ops.gate_logits(narrow, qn, kn, backend=backend)[..., below],
                                   narrow.forward_pooled(qn, kn)[..., below])
    if not ON_GPU:
        with pytest.raises(ValueError, match="runs on"):
            kern.gate_logits(gate, qp.to(torch.device("meta")), kp)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_a_half_precision_gate_is_within_its_rounding(dtype):
    """Products in the gate's dtype (tensor cores on a GPU; float16 under the interpreter, which
    takes no bfloat16): within that dtype's rounding of the gate's float32 logits, and of its own
    half-precision ones."""
    gate = _gate(6, 3, 64, 16)
    qp, kp = _pooled(gate, 1, 1025)
    below = causal_block_mask(qp.shape[2], qp.device)
    exact = gate.forward_pooled(qp, kp)[..., below]
    half = gate.to(dtype)
    got = kern.gate_logits(half, qp, kp)[..., below]
    # a few units in the last place of the logits' scale (fp16 measured 5e-4 of it on a CPU)
    tol = (2e-3 if dtype == torch.float16 else 1.6e-2) * max(1.0, float(exact.abs().max()))
    assert got.dtype == torch.float32 and float((got - exact).abs().max()) <= tol
    own = half.forward_pooled(qp, kp)[..., below]
    assert float((got - own).abs().max()) <= tol
