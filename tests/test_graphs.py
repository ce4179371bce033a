"""sparsify(..., cuda_graphs=True) (seerlib.graphs): the replayed layer steps give the eager
path's logits and statistics. CUDA only: skipped on a CPU (CI); run on the GPU machine."""

import pytest
import torch

from seerlib.distill import tiny_model
from seerlib.gate import GateSet
from seerlib.graphs import StepGraphs
from seerlib.integrate import sparsify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("label", ["gate@0.3", "recommended", "sink_window@0.2", "gate@1"])
def test_graph_replay_equals_eager(label):
    model = tiny_model().cuda().to(torch.bfloat16)
    gates = GateSet.from_config(model.config, block_size=16).cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 160), device="cuda")
    kw = dict(gates=gates, block_size=16)
    if not label.startswith(("gate", "recommended")):
        kw.pop("gates")
    with sparsify(model, label, **kw) as eager:
        want = _logits(model, ids)
    with sparsify(model, label, cuda_graphs=True, **kw) as sp:
        first = _logits(model, ids)  # captures every layer
        again = _logits(model, ids)  # replays
        counted = sp.stats.per_layer
        assert all(counted[i][0] == 2 * kept for i, (kept, _) in eager.stats.per_layer.items())
        other = torch.randint(0, model.config.vocab_size, (1, 96), device="cuda")
        _logits(model, other)  # another length: new graphs
        assert len(sp.graphs) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(first, want, atol=0, rtol=0)
    torch.testing.assert_close(again, want, atol=0, rtol=0)
    assert sp.stats.prefill_calls == 3 * model.config.num_hidden_layers
    assert len(sp.graphs) == 0  # disable() let the graphs go


def test_step_graphs_share_buffers_across_keys():
    g = StepGraphs()
    x = torch.randn(4, 8, device="cuda")

    def step(a, out):
        out.copy_(a * 2)
        return a.sum()

    o1, s1 = g.run("layer0", step, [x], out_like=x)
    torch.testing.assert_close(o1, x * 2)
    o2, s2 = g.run("layer1", step, [x + 1], out_like=x)
    assert o2.data_ptr() == o1.data_ptr() and len(g) == 2  # one shared output buffer
    torch.testing.assert_close(o2, (x + 1) * 2)
    torch.testing.assert_close(s2, (x + 1).sum())


def test_graphed_gate_copies_none_of_the_layer_tensors():
    """The "gate" path pools straight into the graph's inputs: its only static buffers are the
    float32 pooled features, never a copy of q, k, v (bf16) or of the output."""
    model = tiny_model().cuda().to(torch.bfloat16)
    gates = GateSet.from_config(model.config, block_size=16).cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 160), device="cuda")
    with sparsify(model, "gate@0.3", gates=gates, block_size=16, cuda_graphs=True) as sp:
        _logits(model, ids)
        specs = [spec for buffers in sp.graphs._buffers for spec in buffers]
        assert specs and {dtype for _, dtype, _ in specs} == {torch.float32}
        assert len(sp.graphs) == model.config.num_hidden_layers
