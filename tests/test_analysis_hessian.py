"""Hessian-vector products and the top Hessian eigenvalue (lalora.analysis.hessian)."""
import pytest
import torch

from lalora.analysis.hessian import (finite_difference_hvp, hessian_vector_product,
                                     model_loss_closure, top_eigenvalue)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny float64 ops: thread start-up dominates on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quadratic(spectrum, seed=0):
    """L(x) = ½ xᵀ H x over two parameter tensors (a (3, 4) matrix and a (d-12,) vector)."""
    g = torch.Generator().manual_seed(seed)
    d = len(spectrum)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ Q.T
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d - 12, generator=g, dtype=torch.float64, requires_grad=True)

    def loss():
        x = torch.cat([a.flatten(), b])
        return 0.5 * x @ H @ x

    return loss, [a, b], H


SPECTRUM = [10.0, 9.0, 7.5, 5.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0, -1.0, -2.0, -3.0, 0.3, 0.2, 4.0, 6.0, 8.0, 1.5, 2.5]


def test_hvp_equals_explicit_hessian():
    loss, params, H = _quadratic(SPECTRUM)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    hv = hessian_vector_product(loss, params, v)
    expected = H @ torch.cat([t.flatten() for t in v])
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv]), expected, rtol=1e-12, atol=1e-12)


def test_hvp_matches_finite_differences_on_nonlinear_net():
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    X = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    loss = lambda: torch.nn.functional.cross_entropy(torch.tanh(X @ W1.T) @ W2.T, y)  # noqa: E731
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in (W1, W2)]
    before = [p.detach().clone() for p in (W1, W2)]
    exact = hessian_vector_product(loss, [W1, W2], v)
    fd = finite_difference_hvp(loss, [W1, W2], v, eps=1e-5)
    for e, f in zip(exact, fd):
        # central differences: O(eps²) truncation + O(1e-16/eps) round-off  ->  ~1e-9 here
        torch.testing.assert_close(e, f, rtol=1e-6, atol=1e-7)
    for p, b in zip((W1, W2), before):  # finite differences restore the parameters exactly
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("method,max_iter", [("lanczos", 25), ("power", 400)])
def test_top_eigenvalue_of_known_spectrum(method, max_iter):
    loss, params, _ = _quadratic(SPECTRUM)
    res = top_eigenvalue(loss, params, method=method, max_iter=max_iter, tol=1e-10,
                         generator=torch.Generator().manual_seed(0))
    assert abs(res.eigenvalue - 10.0) / 10.0 < 1e-3, res
    assert res.converged


def test_lanczos_returns_largest_algebraic_not_magnitude():
    # Most negative eigenvalue has the largest magnitude; the sharpness is the largest *positive* one.
    loss, params, _ = _quadratic([4.0, 1.0, -9.0] + [0.5] * 17)
    res = top_eigenvalue(loss, params, method="lanczos", max_iter=20, tol=1e-10,
                         generator=torch.Generator().manual_seed(0), return_eigenvector=True)
    assert abs(res.eigenvalue - 4.0) < 1e-6
    hv = hessian_vector_product(loss, params, res.eigenvector)
    for h, v in zip(hv, res.eigenvector):  # the Ritz vector is an eigenvector
        torch.testing.assert_close(h, 4.0 * v, rtol=1e-5, atol=1e-6)


def test_model_loss_closure_and_errors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    batches = [{"x": torch.randn(5, 4, dtype=torch.float64), "labels": torch.randint(0, 3, (5,))} for _ in range(2)]
    fwd = lambda m, b: m(b["x"])  # noqa: E731
    closure = model_loss_closure(model, fwd, batches)
    full = torch.nn.functional.cross_entropy(model(torch.cat([b["x"] for b in batches])),
                                             torch.cat([b["labels"] for b in batches]))
    torch.testing.assert_close(closure(), full)
    params = list(model.parameters())
    res = top_eigenvalue(closure, params, max_iter=30, tol=1e-8, generator=torch.Generator().manual_seed(0))
    # Against the dense Hessian of the flattened parameters.
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def f(flat):
        out, i = [], 0
        for p in params:
            out.append(flat[i:i + p.numel()].view_as(p)); i += p.numel()
        h = torch.tanh(batches[0]["x"] @ out[0].T + out[1]) @ out[2].T + out[3]
        h2 = torch.tanh(batches[1]["x"] @ out[0].T + out[1]) @ out[2].T + out[3]
        return torch.nn.functional.cross_entropy(torch.cat([h, h2]), torch.cat([b["labels"] for b in batches]))

    dense = torch.autograd.functional.hessian(f, flat0)
    assert abs(res.eigenvalue - float(torch.linalg.eigvalsh(dense)[-1])) < 1e-6
    with pytest.raises(ValueError, match="batches"):
        model_loss_closure(model, fwd, [])
    with pytest.raises(ValueError, match="method"):
        top_eigenvalue(closure, params, method="arnoldi")
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="params"):
        top_eigenvalue(closure, [frozen])
