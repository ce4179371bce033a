import torch

from seerlib.metrics import block_maps, block_mass, kl_div, normalize_rows, recall
from seerlib.reference import causal_block_mask, pooled_attention


def qk(B=1, Hq=4, Hkv=2, S=97, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g)


def test_block_mass_matches_dense_attention():
    q, k = qk()
    b = 16
    mass = block_mass(q, k, b)
    assert mass.shape == (1, 4, 7, 7)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 4, 7))
    # dense check: softmax map, sum over key blocks, mean over query rows
    kk = k.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(97, 97, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.nn.functional.pad(p, (0, 15, 0, 15)).reshape(1, 4, 7, 16, 7, 16).sum(5)
    want = p.sum(3) / torch.tensor([16.0] * 6 + [1.0])[:, None]
    torch.testing.assert_close(mass, want)
    assert (mass * ~causal_block_mask(7)).abs().max() == 0


def test_recall():
    q, k = qk()
    mass = block_mass(q, k, 16)
    full = causal_block_mask(7).expand(1, 4, 7, 7)
    assert torch.isclose(recall(mass, full), torch.tensor(1.0))
    diag = torch.eye(7, dtype=torch.bool).expand(1, 4, 7, 7)
    per = recall(mass, diag, per_head=True)
    assert per.shape == (1, 4)
    torch.testing.assert_close(per, mass.diagonal(dim1=-2, dim2=-1).mean(-1))
    # a pooled map works as a proxy after row normalization
    _, pooled = pooled_attention(q, k, k, 16)
    assert 0 < recall(pooled, diag) <= 1


def test_kl():
    t = normalize_rows(torch.rand(2, 3, 5, 5).tril())
    lg = torch.log(t).masked_fill(~causal_block_mask(5), float("-inf"))
    assert kl_div(t, lg).abs() < 1e-5
    lg2 = torch.zeros(2, 3, 5, 5).masked_fill(~causal_block_mask(5), float("-inf"))
    kl = kl_div(t, lg2, skip_rows=1, reduction="none")
    assert kl.shape == (2, 3, 4) and (kl >= -1e-6).all() and kl.sum() > 0
    lg2.requires_grad_(True)
    kl_div(t, lg2).backward()
    assert torch.isfinite(lg2.grad).all()


def test_block_maps_pooled_equals_reference():
    for S, b in ((97, 16), (128, 32), (1, 16)):
        q, k = qk(S=S)
        q = q * 3
        mass, pooled = block_maps(q, k, b)
        _, want = pooled_attention(q, k, k, b)
        torch.testing.assert_close(pooled, want)
        torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]))


def test_block_maps_take_the_logit_soft_cap():
    """Gemma2's soft-cap: the pooled map equals the reference's soft-capped one, and the mass is
    the soft-capped attention's (c * tanh(x / c) of the scaled scores, then mask and softmax)."""
    q, k = qk(seed=2)
    q = q * 3
    mass, pooled = block_maps(q, k, 16, softcap=2.0)
    torch.testing.assert_close(pooled, pooled_attention(q, k, k, 16, softcap=2.0)[1],
                               atol=1e-6, rtol=1e-5)
    kk = k.repeat_interleave(2, dim=1)
    s = 2.0 * torch.tanh((q @ kk.transpose(-1, -2)) / 4.0 / 2.0)
    s = s.masked_fill(torch.ones(97, 97, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.nn.functional.pad(torch.softmax(s, -1), (0, 15, 0, 15))
    want = p.reshape(1, 4, 7, 16, 7, 16).sum((3, 5)) / torch.tensor([16.0] * 6 + [1.0])[:, None]
    torch.testing.assert_close(mass, want)
    assert (block_mass(q, k, 16) - mass).abs().max() > 1e-2
