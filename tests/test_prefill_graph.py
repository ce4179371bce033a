"""`seerlib.prefill_graph.PrefillGraph`: a whole prefill as one CUDA graph. Its refusals run
anywhere; the capture itself (the graph's logits against eager ones, dense and through
`sparsify`, then again for new input ids) runs on a GPU only."""

import pytest
import torch

from seerlib.gate import GateSet
from seerlib.integrate import sparsify
from seerlib.prefill_graph import PrefillGraph
from seerlib.tiny import tiny_family

CUDA = torch.cuda.is_available()
S, B16 = 192, 16


def _ids(seed, device="cpu"):
    return torch.randint(3, 101, (1, S), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("ids, kwargs, match", [
    (torch.zeros(1, S, dtype=torch.long), {}, "runs on CUDA; input_ids are on cpu"),
    (torch.zeros(S, dtype=torch.long), {}, r"\(B, S\) int64 tensor; got \(192,\)"),
    (torch.zeros(1, S), {}, "int64 tensor; got \\(1, 192\\) torch.float32"),
    (torch.zeros(1, S, dtype=torch.long), {"use_cache": True}, "without a KV cache"),
    (torch.zeros(1, S, dtype=torch.long), {"warmup": 0}, "warmup must be at least 1"),
])
def test_bad_arguments_are_named(ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefillGraph(tiny_family("llama"), ids, **kwargs)


@pytest.mark.parametrize("option", ["cuda_graphs", "record_masks"])
def test_a_sparsify_handle_that_cannot_be_captured_is_refused(option):
    model = tiny_family("llama")
    gates = GateSet.from_config(model.config, block_size=B16)
    with sparsify(model, "gate@0.3", gates=gates, block_size=B16, **{option: True}):
        with pytest.raises(ValueError, match=f"{option}=True"):
            PrefillGraph(model, _ids(0), logits_to_keep=1)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("label, compiled", [(None, False), ("gate@0.3", False),
                                             ("gate+sink+local2@0.3", False), ("gate@0.3", True)])
def test_replays_give_the_eager_logits(label, compiled):
    """Dense, or through sparsify's kernel path (its gate logits compiled or not): the graph's
    logits for the capture's ids and for new ids equal an eager call's, and the graph refuses ids
    of another shape."""
    model = tiny_family("llama").to("cuda", torch.bfloat16)
    gates = GateSet.from_config(model.config, block_size=B16).to("cuda", torch.bfloat16)

    def eager(ids):
        with torch.no_grad():
            return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits

    handle = (sparsify(model, label, gates=gates, block_size=B16, compile_selection=compiled)
              if label else None)
    if handle is not None:
        handle.enable()
    try:
        graph = PrefillGraph(model, _ids(0, "cuda"), logits_to_keep=1)
        got = []
        for seed in (0, 1, 2):
            ids = _ids(seed, "cuda")
            got.append(graph(ids).clone())
            torch.testing.assert_close(got[-1], eager(ids), atol=2e-2, rtol=2e-2)
        assert not torch.equal(got[1], got[2])  # each replay read its own ids
        with pytest.raises(ValueError, match="captured for input_ids"):
            graph(torch.zeros(1, S + 1, dtype=torch.long, device="cuda"))
    finally:
        if handle is not None:
            handle.disable()
