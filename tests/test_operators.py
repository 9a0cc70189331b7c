"""The core's linear-operator protocol: adjoints, batched CG against a direct solve, the mask operator."""

from __future__ import annotations

import pytest
import torch

from medidiff.core.operators import LinearOperator, MaskOperator, Scaled, adjoint_test, cg_solve, inner


class Dense(LinearOperator):
    """A dense matrix acting on flattened images (a test oracle)."""

    def __init__(self, mat, shape):
        self.mat, self.shape = mat, shape

    def forward(self, x):
        return (x.flatten(1) @ self.mat.T)

    def adjoint(self, y):
        return (y @ self.mat).reshape(y.shape[0], *self.shape)


class WrongAdjoint(Dense):
    def adjoint(self, y):
        return 1.01 * super().adjoint(y)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_mask_operator_adjoint_and_projection(spatial):
    g = _g()
    x = torch.randn(2, 2, *spatial, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, *spatial, generator=g) > 0.5).double()
    op = MaskOperator(mask)
    assert op.coisometry
    assert adjoint_test(op, x, torch.randn_like(x)) < 1e-12
    # A A^H = I on the measurements, so A^H A is idempotent
    assert torch.allclose(op.normal(op.normal(x)), op.normal(x))
    assert not MaskOperator(0.5 * mask).coisometry


def test_adjoint_test_catches_a_wrong_adjoint():
    g = _g(1)
    mat = torch.randn(7, 12, generator=g, dtype=torch.float64)
    x = torch.randn(3, 1, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 7, generator=g, dtype=torch.float64)
    assert adjoint_test(Dense(mat, (1, 3, 4)), x, y) < 1e-13
    assert adjoint_test(WrongAdjoint(mat, (1, 3, 4)), x, y) > 5e-3
    assert adjoint_test(Scaled(Dense(mat, (1, 3, 4)), -2.5), x, y) < 1e-13
    with pytest.raises(ValueError):
        adjoint_test(Dense(mat, (1, 3, 4)), x, y[:, :3])


def test_inner_is_real_part_for_complex():
    a = torch.tensor([[1 + 2j, 3 - 1j]], dtype=torch.complex128)
    b = torch.tensor([[2 - 1j, 1j]], dtype=torch.complex128)
    # Re(conj(a) b) = Re((1-2i)(2-i)) + Re((3+i)(i)) = 0 + (-1)
    assert inner(a, b).item() == pytest.approx(-1.0)


def test_cg_matches_direct_solve_per_sample():
    g = _g(2)
    n, m, b = 12, 8, 3
    mat = torch.randn(m, n, generator=g, dtype=torch.float64)
    op = Dense(mat, (1, 3, 4))
    y = torch.randn(b, m, generator=g, dtype=torch.float64)
    z = torch.randn(b, 1, 3, 4, generator=g, dtype=torch.float64)
    rho = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    x = cg_solve(op, y, rho=rho, z=z, iters=40, tol=1e-14)
    for i in range(b):
        lhs = mat.T @ mat + rho[i] * torch.eye(n, dtype=torch.float64)
        ref = torch.linalg.solve(lhs, mat.T @ y[i] + rho[i] * z[i].flatten())
        assert torch.allclose(x[i].flatten(), ref, atol=1e-9)


def test_cg_least_squares_and_exact_in_n_steps():
    g = _g(3)
    mat = torch.randn(20, 6, generator=g, dtype=torch.float64)  # overdetermined, full rank
    op = Dense(mat, (1, 2, 3))
    y = torch.randn(2, 20, generator=g, dtype=torch.float64)
    x = cg_solve(op, y, iters=6)  # CG is exact after n = 6 steps in exact arithmetic
    ref = torch.linalg.lstsq(mat, y.T).solution.T
    assert torch.allclose(x.flatten(1), ref, atol=1e-8)
    assert torch.equal(cg_solve(op, y, iters=0), torch.zeros(2, 1, 2, 3, dtype=torch.float64))


def test_cg_mask_closed_form_and_errors():
    g = _g(4)
    mask = (torch.rand(1, 1, 6, 6, generator=g) > 0.3).double()
    op = MaskOperator(mask)
    y = op(torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64))
    z = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    x = cg_solve(op, y, rho=0.5, z=z, iters=3)
    assert torch.allclose(x, (mask * y + 0.5 * z) / (mask + 0.5))
    with pytest.raises(ValueError):
        cg_solve(op, y, rho=-1.0)
    with pytest.raises(ValueError):
        cg_solve(op)
    with pytest.raises(ValueError):
        Dense(torch.eye(2), (1, 1, 2)).merge(torch.zeros(1, 1, 1, 2), torch.zeros(1, 2))


def test_merge_on_a_coisometry():
    g = _g(5)
    mask = (torch.rand(1, 1, 4, 4, generator=g) > 0.5).double()
    op = MaskOperator(mask)
    x = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    y = op(torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64))
    merged = op.merge(x, y, 0.25)
    assert torch.allclose(op(merged), 0.75 * op(x) + 0.25 * y)
    assert torch.allclose((1 - mask) * merged, (1 - mask) * x)
