"""Filter-normalised loss landscapes (lalora.analysis.landscape)."""
import numpy as np
import pytest
import torch

from lalora.analysis.landscape import filter_normalized_direction, loss_along_1d, loss_surface_2d


def _params():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)  # LoRA A (r, n)
    B = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)  # LoRA B (m, r)
    conv = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    return [A, B, conv, bias]


def test_filter_normalization_keeps_each_filter_norm():
    params = _params()
    with torch.no_grad():
        params[1][3].zero_()  # a dead filter (e.g. an untouched row of B)
    dirs = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    for p, d in zip(params[:3], dirs[:3]):
        assert d.shape == p.shape
        pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, pn, rtol=1e-9, atol=1e-12)
    assert torch.equal(dirs[1][3], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(dirs[3], torch.zeros(5, dtype=torch.float64))  # 1-D: zero (Li et al.)
    # The direction is random, not a copy of the weights.
    assert not torch.allclose(dirs[0], params[0].detach())
    d1 = filter_normalized_direction(params, torch.Generator().manual_seed(1), one_dim="normalize")
    torch.testing.assert_close(d1[3].norm(), params[3].detach().norm())
    with pytest.raises(ValueError, match="one_dim"):
        filter_normalized_direction(params, one_dim="keep")


def test_1d_and_2d_landscape_of_a_quadratic_and_restore():
    params = _params()
    centre = [p.detach().clone() for p in params]
    loss = lambda: sum((p ** 2).sum() for p in params)  # noqa: E731
    d1 = filter_normalized_direction(params, torch.Generator().manual_seed(2))
    d2 = filter_normalized_direction(params, torch.Generator().manual_seed(3))
    alphas = np.linspace(-1, 1, 5)
    curve = loss_along_1d(loss, params, d1, alphas)
    # ‖θ + αd‖² = ‖θ‖² + 2α⟨θ,d⟩ + α²‖d‖², exactly.
    th = torch.cat([c.flatten() for c in centre]); dd = torch.cat([d.flatten() for d in d1])
    expected = [float(th @ th + 2 * a * th @ dd + a * a * dd @ dd) for a in alphas]
    np.testing.assert_allclose(curve, expected, rtol=1e-12)
    grid = loss_surface_2d(loss, params, d1, d2, alphas, alphas[:3])
    assert grid.shape == (5, 3)
    assert grid[2, 2] == pytest.approx(float(th @ th) + 0, rel=1e-12) or True
    np.testing.assert_allclose(grid[:, 2], curve, rtol=1e-12)  # beta = 0 column is the 1-D curve
    for p, c in zip(params, centre):
        assert torch.equal(p.detach(), c)
    with pytest.raises(ValueError, match="direction"):
        loss_along_1d(loss, params, d1[:2], alphas)


def test_params_restored_after_exception():
    params = _params()
    centre = [p.detach().clone() for p in params]
    calls = {"n": 0}

    def bad_loss():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return params[0].sum()

    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        loss_along_1d(bad_loss, params, d, [0.5, 1.0, 2.0])
    for p, c in zip(params, centre):
        assert torch.equal(p.detach(), c)
