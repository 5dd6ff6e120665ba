"""Identities of the pure math: ranks, whitening ladder, back-projection, influence normalization, ALS."""

from __future__ import annotations

import pytest
import torch

from air_ft import linalg, native


def _gram(n: int, tokens: int = 400, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, rank or n, generator=g, dtype=torch.float64)
    if rank is not None:
        x = x @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    return x.T @ x


@pytest.mark.parametrize("m,n,rho,k", [(576, 576, 0.6, 172), (192, 576, 0.6, 86), (1536, 576, 0.4, 167),
                                       (4096, 4096, 0.8, 1638)])
def test_rank_formula_uses_real_shapes(m, n, rho, k):
    assert linalg.rank_for_retention(m, n, rho) == k
    assert k * (m + n) <= rho * m * n


def test_rank_formula_keeps_dense_when_nothing_is_saved_and_rejects_bad_retention():
    assert linalg.rank_for_retention(4, 4, 0.99) == 1  # 1 * (4 + 4) < 16 parameters: worth factoring
    assert linalg.rank_for_retention(2, 2, 0.9) is None
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        linalg.rank_for_retention(8, 8, 1.0)
    with pytest.raises(ValueError):
        linalg.rank_for_retention(8, 8, 0.0)


def test_cholesky_rung_reproduces_gram():
    g = _gram(24)
    s, rung = linalg.whitening_factor(g)
    assert rung == "cholesky"
    assert torch.allclose(s @ s.T, g, rtol=1e-12, atol=1e-9)
    assert torch.equal(s, s.tril())


def test_singular_gram_uses_damping_rung():
    g = _gram(24, rank=6)  # rank 6 < 24: not positive definite
    assert torch.linalg.cholesky_ex(g).info.item() != 0
    s, rung = linalg.whitening_factor(g)
    assert rung == "damped"
    damp = (s @ s.T - g).diagonal()
    assert torch.allclose(s @ s.T - g, torch.diag(damp), atol=1e-8 * float(g.abs().max()))
    assert (damp > 0).all()


def test_eigen_rung_is_triangular_square_root_of_clamped_gram():
    g = _gram(16, rank=5)
    s = linalg.eigen_root(g, floor=1e-6)
    evals, evecs = torch.linalg.eigh(g)
    clamped = evecs @ torch.diag(evals.clamp_min(1e-6 * evals.max())) @ evecs.T
    assert torch.equal(s, s.tril())
    assert (s.diagonal() > 0).all()
    assert torch.allclose(s @ s.T, clamped, rtol=1e-9, atol=1e-9 * float(g.abs().max()))


def test_unusable_grams_raise_with_advice():
    with pytest.raises(linalg.WhiteningError, match="NaN or Inf"):
        linalg.whitening_factor(torch.full((4, 4), float("nan"), dtype=torch.float64))
    with pytest.raises(linalg.WhiteningError, match="all zeros"):
        linalg.whitening_factor(torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("m,n,rho", [(4096, 4096, 0.6), (4096, 11008, 0.6), (576, 1536, 0.4), (192, 576, 0.6)])
def test_rank_multiple_rounds_down_within_the_budget(m, n, rho):
    exact = linalg.rank_for_retention(m, n, rho)
    for multiple in (8, 64):
        k = linalg.rank_for_retention(m, n, rho, multiple)
        assert k % multiple == 0 and exact - multiple < k <= exact  # the largest aligned rank within the budget
        assert k * (m + n) <= rho * m * n
    assert linalg.rank_for_retention(m, n, rho, 1) == exact


def test_rank_multiple_keeps_a_rank_below_it_and_rejects_nonsense():
    assert linalg.rank_for_retention(16, 16, 0.6) == 4
    assert linalg.rank_for_retention(16, 16, 0.6, 8) == 4  # never rounded down to zero
    with pytest.raises(ValueError, match="positive integer"):
        linalg.rank_for_retention(16, 16, 0.6, 0)


def test_full_rank_factorization_reproduces_w():
    torch.manual_seed(1)
    w = torch.randn(12, 20, dtype=torch.float64)
    s, _ = linalg.whitening_factor(_gram(20))
    u, sig, vh = linalg.truncated_svd(w @ s, 12)
    uf, vf = linalg.back_project(u, sig, vh, s)
    assert torch.allclose(uf @ vf, w, atol=1e-10)
    uf, vf = linalg.back_project(*linalg.truncated_svd(w, 12))
    assert torch.allclose(uf @ vf, w, atol=1e-10)


def test_truncated_whitened_svd_minimizes_activation_error():
    """SVD-LLM(W): among rank-k maps, (W - W_k) S has the smallest Frobenius norm; plain SVD is worse there."""
    torch.manual_seed(2)
    w = torch.randn(16, 24, dtype=torch.float64)
    g = _gram(24)
    s, _ = linalg.whitening_factor(g)
    uf, vf = linalg.back_project(*linalg.truncated_svd(w @ s, 5), s)
    plain_u, plain_v = linalg.back_project(*linalg.truncated_svd(w, 5))
    err_white = torch.linalg.norm((w - uf @ vf) @ s)
    err_plain = torch.linalg.norm((w - plain_u @ plain_v) @ s)
    assert err_white < err_plain
    # the error equals the tail of the whitened spectrum (Eckart-Young)
    tail = torch.linalg.svdvals(w @ s)[5:]
    assert torch.allclose(err_white, tail.square().sum().sqrt(), rtol=1e-10)


def test_normalizations():
    torch.manual_seed(3)
    imap = torch.rand(30, 40).pow(8) * 1e4  # heavy tail
    imap[0, :5] = 1e7  # outliers: max/mean far above the cap
    mean = linalg.normalize_influence(imap, "mean")
    assert torch.isclose(mean.mean(), torch.tensor(1.0), atol=1e-5)
    power = linalg.normalize_influence(imap, "power", max_ratio=100)
    assert torch.isclose(power.mean(), torch.tensor(1.0), atol=1e-4)
    assert float(power.max() / power.mean()) <= 100 * (1 + 1e-3)
    assert float(power.max() / power.mean()) > 90  # the cap is reached, not undershot
    shifted = imap - imap.min()
    assert torch.equal(power.flatten().argsort(stable=True)[-50:], shifted.flatten().argsort(stable=True)[-50:])
    rank = linalg.normalize_influence(imap, "rank")
    assert torch.isclose(rank.mean(), torch.tensor(1.0), atol=1e-4) and float(rank.max()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown normalization"):
        linalg.normalize_influence(imap, "zscore")
    with pytest.raises(ValueError, match="NaN or Inf"):
        linalg.normalize_influence(torch.tensor([[1.0, float("nan")]]))


def _reference_als(target, c, u, sig, vh):
    """Eqs. 5-6 written literally, one sum per entry, with the residual recomputed from scratch each step."""
    u, sig, vh = u.clone(), sig.clone(), vh.clone()
    m, n = target.shape
    for r in range(len(sig) - 1, -1, -1):
        approx = (u * sig) @ vh
        e = target - approx + sig[r] * torch.outer(u[:, r], vh[r])
        v_new = torch.zeros(n, dtype=target.dtype)
        for j in range(n):
            v_new[j] = (c[:, j] * u[:, r] * e[:, j]).sum() / (sig[r] * (c[:, j] * u[:, r] ** 2).sum())
        u_t = torch.zeros(m, dtype=target.dtype)
        for i in range(m):
            u_t[i] = (c[i] * v_new * e[i]).sum() / (c[i] * v_new**2).sum()
        sig[r] = torch.linalg.norm(u_t)
        u[:, r] = u_t / sig[r]
        vh[r] = v_new
    return (u * sig) @ vh


def _instance(m=10, n=14, k=4, seed=0, delta=2.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    c = 1 + delta * torch.rand(m, n, generator=g, dtype=torch.float64).pow(3) * 4
    u, s, vh = linalg.truncated_svd(w, k)
    return w, c, u, s, vh


BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason="no C compiler for the fused ALS kernel"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_als_matches_literal_equations(backend):
    w, c, u, s, vh = _instance()
    res = linalg.als_sweep(w, c, u, s, vh, dtype=torch.float64, backend=backend)
    ref = _reference_als(w, c, u, s, vh)
    assert torch.allclose((res.u * res.sigma) @ res.vh, ref, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_als_objective_never_increases_at_any_rank_step(seed, backend):
    m, n = [(20, 30), (30, 20), (8, 64), (25, 25)][seed % 4]
    w, c, u, s, vh = _instance(m, n, k=1 + seed % 7, seed=seed, delta=[0.5, 2.0, 10.0][seed % 3])
    res = linalg.als_sweep(w, c, u, s, vh, sweeps=3, track_steps=True, dtype=torch.float64, backend=backend)
    trace = torch.tensor(res.objective, dtype=torch.float64)
    assert len(trace) == 1 + 3 * len(s)
    assert (trace[1:] <= trace[:-1] * (1 + 1e-12)).all(), trace
    assert trace[-1] < trace[0]  # non-uniform weights: the SVD start is not optimal, ALS improves on it
    assert res.objective[0] == pytest.approx(linalg.weighted_objective(c, w, (u * s) @ vh), rel=1e-12)
    assert res.objective[-1] == pytest.approx(
        linalg.weighted_objective(c, w, (res.u * res.sigma) @ res.vh), rel=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_als_with_uniform_weights_keeps_the_svd_solution(backend):
    w, _, u, s, vh = _instance()
    res = linalg.als_sweep(w, torch.ones_like(w), u, s, vh, dtype=torch.float64, backend=backend)
    assert torch.allclose((res.u * res.sigma) @ res.vh, (u * s) @ vh, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_als_tolerance_stops_early(backend):
    w, c, u, s, vh = _instance()
    res = linalg.als_sweep(w, c, u, s, vh, sweeps=50, tol=1e-3, dtype=torch.float64, backend=backend)
    assert 1 < res.sweeps < 50


@pytest.mark.skipif(not native.available(), reason="no C compiler for the fused ALS kernel")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("m", "n", "k"), [(100, 23, 9), (23, 37, 23), (1, 9, 1), (97, 16, 1), (96, 96, 96)])
def test_native_kernel_equals_the_torch_path(m, n, k, threads, monkeypatch):
    """Same updates, same order: factors and the per-step objective agree to rounding, any row split (rows are
    split over up to m // 32 threads)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w, c, u, s, vh = _instance(m, n, k, seed=m + k)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        ref = linalg.als_sweep(w, c, u, s, vh, sweeps=2, track_steps=True, dtype=dtype, backend="torch")
        got = linalg.als_sweep(w, c, u, s, vh, sweeps=2, track_steps=True, dtype=dtype, backend="native")
        scale = float(w.abs().max())
        assert torch.allclose((got.u * got.sigma) @ got.vh, (ref.u * ref.sigma) @ ref.vh, atol=tol * scale)
        assert torch.allclose(got.sigma, ref.sigma, rtol=tol, atol=tol * scale)
        obj = torch.tensor(ref.objective, dtype=torch.float64)
        total = float((c * w * w).sum())  # the objective of the zero approximation
        assert torch.allclose(torch.tensor(got.objective, dtype=torch.float64), obj, rtol=tol, atol=tol * total)


def test_native_backend_falls_back_to_torch_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("AIR_FT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    w, c, u, s, vh = _instance()
    with pytest.warns(UserWarning, match="fused ALS kernel is unavailable"):
        auto = linalg.als_sweep(w, c, u, s, vh, dtype=torch.float64)
    ref = linalg.als_sweep(w, c, u, s, vh, dtype=torch.float64, backend="torch")
    assert torch.equal(auto.u, ref.u) and torch.equal(auto.vh, ref.vh)
    with pytest.raises(native.NativeUnavailable, match="no-such-cc"):
        linalg.als_sweep(w, c, u, s, vh, dtype=torch.float64, backend="native")
    with pytest.raises(ValueError, match="backend must be"):
        linalg.als_sweep(w, c, u, s, vh, backend="cuda")
    assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-built left behind


@pytest.mark.skipif(not native.available(), reason="no C compiler for the fused ALS kernel")
def test_native_kernel_rejects_tensors_it_cannot_read():
    w, c, u, s, vh = _instance()
    with pytest.raises(ValueError, match="CPU float32/float64"):
        linalg.als_sweep(w.half(), c.half(), u.half(), s.half(), vh.half(), dtype=torch.float16, backend="native")
    k = len(s)
    resid, us, vs = w.clone(), (u * s).T.contiguous(), vh.contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        native.sweep(resid.T, c, us, vs, torch.ones(k, w.shape[1], dtype=w.dtype))
    with pytest.raises(ValueError, match="shape mismatch"):
        native.sweep(resid, c, us, vs, torch.ones(k + 1, w.shape[1], dtype=w.dtype))


def test_symmetric_root_whitens_like_cholesky_and_gives_the_same_svdllm_solution():
    torch.manual_seed(4)
    g = _gram(20)
    s_sym, rung = linalg.whitening_factor(g, kind="symmetric")
    assert rung == "symmetric" and torch.allclose(s_sym, s_sym.T)
    assert torch.allclose(s_sym @ s_sym.T, g, rtol=1e-9, atol=1e-8)
    s_chol, _ = linalg.whitening_factor(g)
    w = torch.randn(12, 20, dtype=torch.float64)
    a = linalg.back_project(*linalg.truncated_svd(w @ s_sym, 5), s_sym)
    b = linalg.back_project(*linalg.truncated_svd(w @ s_chol, 5), s_chol)
    assert torch.allclose(a[0] @ a[1], b[0] @ b[1], atol=1e-9)  # W_k is invariant to the choice of root
    s_low, rung = linalg.whitening_factor(_gram(20, rank=4), kind="symmetric")
    assert rung == "symmetric-clamped" and torch.isfinite(s_low).all()
    with pytest.raises(ValueError, match="unknown whitening"):
        linalg.whitening_factor(g, kind="qr")

