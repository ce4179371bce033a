import pytest
import torch

from seerlib.metrics import block_mass, recall
from seerlib.patterns import sink_window, vertical_slash
from seerlib.reference import causal_block_mask
from seerlib.select import Selection, achieved_density, density_to_k, select_blocks


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5])
def test_sink_window(density):
    nb = 64
    m = sink_window(nb, density, batch=2, num_heads=3)
    assert m.shape == (2, 3, nb, nb) and m.dtype == torch.bool
    assert not (m & ~causal_block_mask(nb)).any()
    k = density_to_k(density, nb)
    assert torch.equal(m[0, 0].sum(-1), torch.clamp(torch.arange(1, nb + 1), max=k))
    assert m[..., 0].all() and m[..., torch.eye(nb, dtype=torch.bool)].all()
    assert abs(achieved_density(m) - density) < 0.03


def qk(S=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, S, 16, generator=g), torch.randn(1, 2, S, 16, generator=g)


def test_oracle_is_best_topk():
    q, k = qk()
    mass = block_mass(q, k, 16)
    for density in (0.1, 0.3, 0.5):
        mo = select_blocks(mass, Selection(density=density))  # the oracle-max/-sum rule
        assert abs(achieved_density(mo) - density) < 0.1  # nb = 16: k rounds down
        assert recall(mass, mo) >= recall(mass, sink_window(16, density, 1, 1, 4)) - 1e-6
        assert mo[..., torch.eye(16, dtype=torch.bool)].all()


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5])
def test_vertical_slash(density):
    q, k = qk(S=250)
    m = vertical_slash(q, k, density, 16)
    assert m.shape == (1, 4, 16, 16)
    assert not (m & ~causal_block_mask(16)).any()
    assert m[..., torch.eye(16, dtype=torch.bool)].all()
    assert abs(achieved_density(m) - density) < 0.15


def test_vertical_slash_finds_a_vertical_line():
    """A key block every query attends to is found as a vertical line."""
    q, k = qk(S=256)
    k[:, :, 80:96] = q[:, ::2, -1:].mean(2, keepdim=True) * 6  # block 5 is loud for all queries
    m = vertical_slash(q, k, 0.2, 16)
    assert m[0, :, 6:, 5].all()
