"""Identities of the output side: the blended output Gram, the two-sided solution, loss spectra, rank allocation."""

from __future__ import annotations

import pytest
import torch

from air_ft import curvature, linalg

from .test_linalg import _gram


def _two_sided_error(w, approx, g, h):
    """tr(H dW G dW^T): the error seen through the output Gram H and the input Gram G."""
    d = w - approx
    return float(torch.trace(h @ d @ g @ d.T))


def test_output_factor_blends_the_normalized_output_gram_with_the_identity():
    h = _gram(24, seed=3) * 1e-6  # a gradient's scale is arbitrary: the blend normalizes it
    eye, rung = curvature.output_factor(h, 0.0)
    assert rung == "identity" and torch.equal(eye, torch.eye(24, dtype=torch.float64))
    lf, rung = curvature.output_factor(h, 0.3)
    blend = 0.7 * torch.eye(24, dtype=torch.float64) + 0.3 * h / torch.diagonal(h).mean()
    assert rung == "cholesky" and torch.allclose(lf @ lf.T, blend, rtol=1e-10, atol=1e-12)
    assert torch.allclose(curvature.output_factor(h * 1e9, 0.3)[0], lf, rtol=1e-9)  # scale-free
    assert curvature.output_factor(_gram(24, rank=5), 1.0)[1] == "damped"  # a singular H at w = 1 is damped
    with pytest.raises(linalg.WhiteningError, match="output_weight: 0"):
        curvature.output_factor(torch.zeros(4, 4, dtype=torch.float64), 0.5)
    with pytest.raises(linalg.WhiteningError, match="NaN"):
        curvature.output_factor(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.5)


def test_two_sided_solution_with_an_identity_output_gram_is_the_input_only_solution():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    s, _ = linalg.whitening_factor(_gram(20, seed=5))
    lf, _ = curvature.output_factor(3.0 * torch.eye(30, dtype=torch.float64), 1.0)  # H = c I: L = I
    assert torch.allclose(lf, torch.eye(30, dtype=torch.float64))
    u, sig, vh = curvature.output_weighted_svd(w @ s, lf, 7)
    u0, sig0, vh0 = linalg.truncated_svd(w @ s, 7)
    assert torch.allclose(u * sig @ vh, u0 * sig0 @ vh0, atol=1e-10)
    assert torch.allclose(sig, sig0, rtol=1e-10)


def test_two_sided_solution_minimizes_the_two_sided_error_and_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    gin, hout = _gram(20, seed=7), _gram(30, seed=8)
    s, _ = linalg.whitening_factor(gin)
    lf, _ = curvature.output_factor(hout, 1.0)
    h = lf @ lf.T  # the normalized output Gram the factor whitens
    u, sig, vh = curvature.output_weighted_svd(w @ s, lf, 6)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=torch.float64), atol=1e-10)  # SVD form: orthonormal factors
    assert torch.allclose(vh @ vh.T, torch.eye(6, dtype=torch.float64), atol=1e-10)
    two = torch.matmul(*linalg.back_project(u, sig, vh, s))
    one = torch.matmul(*linalg.back_project(*linalg.truncated_svd(w @ s, 6), s))
    best = _two_sided_error(w, two, gin, h)
    assert best < 0.95 * _two_sided_error(w, one, gin, h)  # the input-only solution is worse in this metric
    for trial in range(20):  # and no nearby rank-6 matrix does better
        du = 1e-3 * torch.randn(30, 6, generator=g, dtype=torch.float64)
        dv = 1e-3 * torch.randn(6, 20, generator=g, dtype=torch.float64)
        uf, vf = linalg.back_project(u, sig, vh, s)
        assert _two_sided_error(w, (uf + du) @ (vf + dv), gin, h) >= best * (1 - 1e-12), trial
    full = curvature.output_weighted_svd(w @ s, lf, 20)
    assert torch.allclose(torch.matmul(*linalg.back_project(*full, s)), w, atol=1e-8)


def test_loss_spectrum_sums_to_the_two_sided_error_of_each_truncation():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    gin, hout = _gram(16, seed=10), _gram(24, seed=11) * 1e-4
    s, _ = linalg.whitening_factor(gin)
    energy = curvature.loss_spectrum(w, s, hout)
    assert energy.shape == (16,) and bool((energy[:-1] >= energy[1:]).all())
    lf, _ = linalg.whitening_factor(hout)
    for k in (3, 8):  # the tail of the spectrum is the unnormalized two-sided error of the best rank-k matrix
        ub, sb, vhb = linalg.truncated_svd(lf.T @ w @ s, k)
        best = torch.linalg.solve(lf.T, ub * sb) @ vhb @ torch.linalg.inv(s)
        assert _two_sided_error(w, best, gin, hout) == pytest.approx(float(energy[k:].sum()), rel=1e-8)


def test_global_allocation_keeps_the_budget_floors_and_ceilings_and_follows_the_energy():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (32, 64)}
    uniform = {n: linalg.rank_for_retention(m, n_, 0.5) for n, (m, n_) in shapes.items()}
    decay = torch.arange(64, dtype=torch.float64)
    spectra = {"a": 100.0 * 0.9 ** decay, "b": 1.0 * 0.5 ** decay, "c": 10.0 * 0.8 ** decay[:32]}
    budget = sum(uniform[n] * sum(shapes[n]) for n in shapes)
    ranks = curvature.allocate_ranks(spectra, shapes, uniform, floor=0.5, ceiling=2.0)
    spent = sum(ranks[n] * sum(shapes[n]) for n in shapes)
    assert spent <= budget and budget - spent < max(sum(s) for s in shapes.values())  # nothing affordable is left
    assert ranks["a"] > uniform["a"] and ranks["b"] == -(-uniform["b"] // 2)  # energy wins, the floor holds
    for n, (m, n_) in shapes.items():
        assert ranks[n] <= 2 * uniform[n] and ranks[n] * (m + n_) < m * n_
    # between layers of one shape (one cost per direction) no move of a direction raises the kept energy
    kept = {n: float(spectra[n][:ranks[n]].sum()) for n in shapes}
    for a in shapes:
        for b in shapes:
            if a != b and shapes[a] == shapes[b] and ranks[b] > -(-uniform[b] // 2) and ranks[a] < 2 * uniform[a]:
                gain = float(spectra[a][ranks[a]]) / sum(shapes[a])
                loss = float(spectra[b][ranks[b] - 1]) / sum(shapes[b])
                assert gain <= loss + 1e-12, (a, b)
    assert sum(kept.values()) > sum(float(spectra[n][:uniform[n]].sum()) for n in shapes)
    # flat spectra and the same shapes give the uniform ranks back; multiples hold
    flat = {n: torch.ones(64, dtype=torch.float64) for n in ("a", "b")}
    same = curvature.allocate_ranks(flat, {"a": (64, 64), "b": (64, 64)}, {"a": 16, "b": 16})
    assert same == {"a": 16, "b": 16}
    eight = curvature.allocate_ranks(spectra, shapes, uniform, multiple=8)
    assert all(k % 8 == 0 for k in eight.values())
    assert curvature.allocate_ranks(spectra, shapes, {**uniform, "c": None})["c"] is None
    with pytest.raises(ValueError, match="floor"):
        curvature.allocate_ranks(spectra, shapes, uniform, floor=1.5)


def test_air_sweep_in_two_sided_coordinates_starts_at_the_two_sided_solution_and_never_increases_its_objective():
    from types import SimpleNamespace

    from air_ft.methods import METHODS

    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    s, _ = linalg.whitening_factor(_gram(16, seed=8))
    lf, _ = curvature.output_factor(_gram(24, seed=9), 0.5)
    imap = torch.rand(24, 16, generator=g, dtype=torch.float64) ** 4  # a peaked influence map
    cfg = SimpleNamespace(delta=2.0, influence="fisher_whitened", normalization="mean", max_ratio=100.0, sweeps=3,
                          tol=0.0, als_dtype="float64", als_backend="torch", als_output_side=True)
    layer = {"whitening": (s, "cholesky"), "output": (lf, "cholesky"), "fisher_whitened": imap}
    k = 5
    c = 1.0 + 2.0 * linalg.normalize_influence(imap, "mean", 100.0)

    def objective(uf, vf):  # AIR's weighted error in L^T W S
        return float((c * (lf.T @ (w - uf @ vf) @ s) ** 2).sum())

    start = linalg.back_project(*curvature.output_weighted_svd(w @ s, lf, k), s)
    uf, vf, extra = METHODS["air"].factor(w, k, layer, cfg)
    assert uf.shape == (24, k) and vf.shape == (k, 16)
    assert objective(uf, vf) < objective(*start)  # the sweep lowers the two-sided weighted error from the start
    assert extra["objective_end"] <= extra["objective_start"]
    # in W S coordinates instead (the default), the same start and map give another solution
    other = METHODS["air"].factor(w, k, layer, SimpleNamespace(**{**vars(cfg), "als_output_side": False}))
    assert not torch.allclose(uf @ vf, other[0] @ other[1])
    # L = I: both coordinates are the same problem
    eye = torch.eye(24, dtype=torch.float64)
    same = [METHODS["air"].factor(w, k, {**layer, "output": (eye, "identity")},
                                  SimpleNamespace(**{**vars(cfg), "als_output_side": side}))
            for side in (True, False)]
    assert torch.allclose(same[0][0] @ same[0][1], same[1][0] @ same[1][1], atol=1e-10)
