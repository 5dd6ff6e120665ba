"""Pure tensor math for low-rank compression: ranks, whitening, truncated SVD, influence normalization, AIR's ALS.

Nothing here knows about models, configs or files. Shapes follow ``nn.Linear``: a weight ``W`` is ``m x n``
(out x in), a layer computes ``y = W x``; the factored layer computes ``y = U (V x)`` with ``U: m x k``,
``V: k x n``. Equation numbers refer to AIR (arXiv 2606.19993) as restated in docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from air_ft import gpu_als, native
from air_ft.errors import WhiteningError

ALS_BACKENDS = ("auto", "native", "triton", "torch")  # who runs a sweep; :func:`als_sweep`

__all__ = [
    "rank_for_retention",
    "whitening_factor",
    "eigen_root",
    "symmetric_root",
    "WhiteningError",
    "truncated_svd",
    "back_project",
    "normalize_influence",
    "weighted_objective",
    "als_sweep",
    "triton_available",
    "ALS_BACKENDS",
]


def rank_for_retention(m: int, n: int, retention: float, multiple: int = 1) -> int | None:
    """Rank ``k = floor(rho m n / (m + n))`` clipped to ``[1, min(m, n)]``; ``None`` if factoring saves nothing.

    ``multiple > 1`` rounds ``k`` down to a multiple of it (never to zero: a rank below ``multiple`` is kept), so
    the factors' inner dimension suits GPU matrix kernels (bf16 tensor cores want multiples of 8); the layer then
    keeps slightly fewer parameters than ``retention`` allows, never more.

    The factored layer stores ``k (m + n)`` numbers instead of ``m n``; when that is not smaller the layer
    stays dense (docs/method.md section 1). ``m`` and ``n`` are the real shapes (GQA k/v projections included).
    """
    if not 0.0 < retention < 1.0:
        raise ValueError(f"retention must lie strictly between 0 and 1, got {retention}")
    if multiple < 1:
        raise ValueError(f"rank multiple must be a positive integer, got {multiple}")
    k = int(math.floor(retention * m * n / (m + n)))
    k = max(1, min(k, min(m, n)))
    if k >= multiple:
        k -= k % multiple
    if k * (m + n) >= m * n:
        return None
    return k


def whitening_factor(gram: torch.Tensor, eps: float = 0.0, kind: str = "cholesky") -> tuple[torch.Tensor, str]:
    """A square root ``S`` with ``S S^T = G (+ damping)``, computed in float64.

    ``kind="cholesky"`` (the paper's) gives a lower-triangular ``S``. ``kind="symmetric"`` gives
    ``S = Q Lambda^{1/2} Q^T`` (eigenvalues clamped at ``1e-10 lambda_max``). Both whiten equally, so SVD-LLM(W) is
    the same with either; they differ for AIR, whose weights are element-wise in the whitened coordinates: the
    columns of ``W Q Lambda^{1/2} Q^T`` stay attached to the input features that the influence map ``I`` indexes,
    while a Cholesky factor mixes feature ``j`` into every column ``l <= j`` in an order that is arbitrary.

    The ladder (docs/method.md section 2): plain Cholesky of ``G + eps I``; then damping
    ``eps' = max(1.1 |lambda_min|, 1e-6 lambda_max, tiny)``; finally a symmetric eigen square root with clamped
    eigenvalues, made triangular by a QR step so that ``S^{-1}`` is still a triangular solve.

    Returns:
        ``(S, rung)`` with ``rung`` one of ``"cholesky"``, ``"damped"``, ``"eigen"``.

    Raises:
        WhiteningError: if ``G`` holds NaN/Inf or is zero, where no rung can help.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    n = g.shape[0]
    if not torch.isfinite(g).all():
        raise WhiteningError("Gram matrix contains NaN or Inf: calibration activations overflowed; use float32 "
                             "calibration (dtype=float32) or check the model weights")
    if kind == "symmetric":
        return symmetric_root(g + eps * torch.eye(n, dtype=torch.float64, device=g.device))
    if kind != "cholesky":
        raise ValueError(f"unknown whitening {kind!r}; choose 'cholesky' or 'symmetric'")
    eye = torch.eye(n, dtype=torch.float64, device=g.device)
    s, info = torch.linalg.cholesky_ex(g + eps * eye)
    if info.item() == 0 and torch.isfinite(s).all():
        return s, "cholesky"
    evals = torch.linalg.eigvalsh(g)
    lam_max = float(evals[-1].abs().max())
    if lam_max == 0.0:
        raise WhiteningError("Gram matrix is all zeros: this layer saw no non-zero input during calibration; "
                             "exclude it (exclude regex) or use more calibration text")
    tiny = torch.finfo(torch.float64).tiny ** 0.5
    damp = max(1.1 * abs(float(evals[0])), 1e-6 * lam_max, tiny)
    s, info = torch.linalg.cholesky_ex(g + damp * eye)
    if info.item() == 0 and torch.isfinite(s).all():
        return s, "damped"
    return eigen_root(g), "eigen"


def symmetric_root(gram: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, str]:
    """``S = Q max(Lambda, floor lambda_max)^{1/2} Q^T``; rung ``"symmetric"`` or ``"symmetric-clamped"``."""
    evals, evecs = torch.linalg.eigh(gram)
    lam_max = float(evals.abs().max())
    if lam_max == 0.0:
        raise WhiteningError("Gram matrix is all zeros: this layer saw no non-zero input during calibration; "
                             "exclude it (exclude regex) or use more calibration text")
    low = floor * lam_max
    clamped = bool((evals < low).any())
    root = (evecs * evals.clamp_min(low).sqrt()) @ evecs.T
    return 0.5 * (root + root.T), "symmetric-clamped" if clamped else "symmetric"


def eigen_root(gram: torch.Tensor, floor: float = 1e-10) -> torch.Tensor:
    """Last rung of the ladder: a lower-triangular ``S`` with ``S S^T = Q max(Lambda, floor lambda_max) Q^T``.

    The symmetric eigen square root ``R = Q Lambda^{1/2}`` is turned triangular through the QR of ``R^T``
    (``R^T = Q' T`` gives ``R R^T = T^T T``), so ``S^{-1}`` stays a triangular solve.
    """
    g = 0.5 * (gram + gram.T).to(torch.float64)
    evals, evecs = torch.linalg.eigh(g)
    lam_max = float(evals.abs().max())
    if lam_max == 0.0 or not torch.isfinite(evals).all():
        raise WhiteningError("Gram matrix could not be factored even by the eigen fallback; raise eps or use "
                             "more calibration samples")
    root = evecs * evals.clamp_min(floor * lam_max).sqrt()
    _, r = torch.linalg.qr(root.T)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(r.dtype)
    s = r.T * sign  # flip column signs so the diagonal is positive; S S^T is unchanged
    if not torch.isfinite(s).all() or (torch.diagonal(s) <= 0).any():
        raise WhiteningError("Gram matrix could not be factored even by the eigen fallback; raise eps or use "
                             "more calibration samples")
    return s


def truncated_svd(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U_k: m x k, sigma_k: k, Vh_k: k x n)`` of ``w``; optimal in Frobenius norm."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def back_project(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor,
                 s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``U diag(sigma) Vh`` into balanced factors and undo the whitening (docs/method.md section 2, step 4).

    ``U_f = U sqrt(sigma)``, ``V_f = sqrt(sigma) Vh S^{-1}``. ``S^{-1}`` is applied by solving ``X S = B`` on the
    right (a triangular solve for a Cholesky factor), never an explicit inverse. With ``s=None`` no whitening is
    undone (plain SVD variants).
    """
    root = sigma.clamp_min(0).sqrt()
    uf = u * root
    vf = root[:, None] * vh
    if s is not None:
        s = s.to(vf.dtype)
        if torch.equal(s, s.tril()):
            vf = torch.linalg.solve_triangular(s, vf, upper=False, left=False)
        else:
            vf = torch.linalg.solve(s, vf, left=False)
    return uf, vf


def normalize_influence(imap: torch.Tensor, mode: str = "mean", max_ratio: float = 100.0,
                        iters: int = 50) -> torch.Tensor:
    """Make an influence map dimensionless so that ``delta`` means the same for every matrix.

    Args:
        imap: non-negative ``m x n`` influence.
        mode: ``"mean"`` scales to unit mean (the paper). ``"power"`` follows the authors' reference code: shift to
            min 0, scale to mean 1, then raise to a power ``p in (0, 1]`` found by bisection so that, after rescaling
            to mean 1, the maximum is at most ``max_ratio`` (the dynamic range is capped, ranks preserved).
            ``"rank"`` replaces values by their quantile in ``[0, 2]`` (mean 1), a robust variant.
        max_ratio: cap on ``max / mean`` for ``"power"``.
        iters: bisection steps for ``"power"``.
    """
    x = imap.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("influence map contains NaN or Inf: the calibration loss or gradients overflowed; "
                         "calibrate in float32 or lower the learning-rate-free scale of the inputs")
    if mode == "mean":
        mean = x.mean()
        return x / mean if mean > 0 else torch.zeros_like(x)
    if mode == "rank":
        flat = x.flatten()
        order = flat.argsort()
        ranks = torch.empty_like(flat)
        ranks[order] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
        return (2.0 * ranks / max(flat.numel() - 1, 1)).view_as(x)
    if mode != "power":
        raise ValueError(f"unknown normalization {mode!r}; choose 'mean', 'power' or 'rank'")
    x = x - x.min()
    mean = x.mean()
    if mean <= 0:
        return torch.zeros_like(x)
    x = x / mean

    def ratio(p: float) -> float:
        y = x.pow(p)
        return float(y.max() / y.mean())

    if ratio(1.0) <= max_ratio:
        return x
    lo, hi = 0.0, 1.0  # ratio(0) == 1 (every positive entry -> 1), ratio grows with p
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > max_ratio:
            hi = mid
        else:
            lo = mid
    y = x.pow(lo)
    return y / y.mean()


def weighted_objective(c: torch.Tensor, target: torch.Tensor, approx: torch.Tensor) -> float:
    """Eq. 4: ``sum_ij C_ij (W'_ij - approx_ij)^2`` accumulated in float64."""
    d = (target - approx).to(torch.float64)
    return float((c.to(torch.float64) * d * d).sum())


@dataclass
class ALSResult:
    """Outcome of :func:`als_sweep`: the new rank-k factors and the objective trace."""

    u: torch.Tensor  # m x k, unit-norm columns
    sigma: torch.Tensor  # k
    vh: torch.Tensor  # k x n, unit-norm rows
    objective: list[float]  # Eq. 4 before the sweep and after every rank step (if tracked) or sweep
    sweeps: int


def _backend(backend: str, resid: torch.Tensor, track_steps: bool) -> str:
    """Which implementation runs a sweep: ``native`` (the C kernel, CPU), ``triton`` (GPU kernels) or ``torch``."""
    if backend not in ALS_BACKENDS:
        raise ValueError(f"ALS backend must be one of {', '.join(ALS_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not gpu_als.usable(resid):
            raise ValueError(f"the Triton ALS kernels run on CUDA float32 tensors, not {resid.dtype} on "
                             f"{resid.device}; use backend 'torch' or 'auto'")
        if track_steps:
            raise ValueError("the Triton ALS kernels do not record the objective after every rank step; use "
                             "backend 'torch' for track_steps")
        return "triton"
    if backend == "native" or resid.device.type == "cpu":
        if not native.usable(resid):
            if backend == "native":
                raise ValueError(f"the native ALS kernel runs on CPU float32/float64 tensors, not {resid.dtype} on "
                                 f"{resid.device}; use backend 'torch' or 'auto'")
            return "torch"
        if backend == "native":
            native.load()  # raises NativeUnavailable with the compiler's message
            return "native"
        if not native.available():
            native.warn_fallback()
            return "torch"
        return "native"
    # auto on an accelerator: the Triton kernels when they build and pass their check, else torch
    if resid.device.type == "cuda" and gpu_als.usable(resid) and not track_steps:
        if triton_available(resid.device):
            return "triton"
        gpu_als.warn_fallback()
    return "torch"


def _converged(trace: list[float], steps: int, tol: float) -> bool:
    """The last sweep (``steps`` entries of the trace) improved Eq. 4 by less than ``tol`` relative."""
    prev, cur = trace[-1 - steps], trace[-1]
    return tol > 0 and prev > 0 and (prev - cur) / prev < tol


def als_sweep(target: torch.Tensor, c: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor,
              sweeps: int = 1, tol: float = 0.0, track_steps: bool = False,
              dtype: torch.dtype = torch.float32, backend: str = "auto") -> ALSResult:
    """Weighted low-rank refinement by alternating least squares over rank-1 components (Eqs. 5-6).

    Starts from ``target ~= U diag(sigma) Vh`` (the SVD-LLM(W) solution of the whitened weight) and visits
    components ``r = k-1, ..., 0``. With ``E_r = R + sigma_r u_r v_r^T`` (the residual ``R = target - current``
    with component ``r`` added back), ``b = sigma_r v_r`` is replaced by its exact weighted least-squares optimum
    for fixed ``u_r`` (Eq. 5), then ``u~ = sigma_r u_r`` by its optimum for fixed ``b`` (Eq. 6). Each update
    minimizes a convex quadratic in one block, so Eq. 4 never increases (Proposition 3.1). ``R`` is updated in
    place, so a rank step costs O(mn) and a sweep O(kmn).

    Args:
        target: whitened weight ``W' = W S``, ``m x n``.
        c: element weights ``C = 1 + delta I``, ``m x n``, all entries > 0.
        u, sigma, vh: starting factors (``m x k``, ``k``, ``k x n``).
        sweeps: maximum number of backward sweeps.
        tol: stop early once a sweep improves the objective by less than ``tol`` relative.
        track_steps: record the exact objective after every rank step (one extra pass each; for tests/audits).
        dtype: working precision of the sweep.
        backend: ``torch`` (the reference below, any device), ``native`` (the fused C kernel of
            :mod:`air_ft.native`: the same updates in the same order, one pass over the residual per rank step;
            CPU only), ``triton`` (the GPU kernels of :mod:`air_ft.gpu_als`, same order; CUDA float32, no
            per-step tracking) or ``auto`` (native on CPU, triton on CUDA, when they build; else torch).
    """
    c = c.to(dtype)
    tgt = target.to(dtype)
    # Components are kept unnormalized during the sweeps: row r of ``us`` / ``vs`` is u~_r / b_r with sigma folded
    # in (Eqs. 5-6 are invariant to how the scale is split), normalized once at the end. Copies: the caller's
    # tensors are never mutated.
    us = (u.to(dtype) * sigma.to(dtype)).T.contiguous()  # k x m
    vs = vh.to(dtype).contiguous().clone()  # k x n
    resid = tgt - us.T @ vs
    ce = torch.empty_like(resid)
    b2, den_u = torch.empty(vs.shape[1], dtype=dtype), torch.empty(us.shape[1], dtype=dtype)
    k = us.shape[0]

    def objective() -> float:
        return float((c.to(torch.float64) * resid.to(torch.float64).square()).sum())

    trace = [objective()]
    done = 0
    tiny = torch.finfo(dtype).tiny
    impl = _backend(backend, resid, track_steps)
    for _ in range(sweeps):
        # Eq. 5's denominators sum_i C_ij u_r[i]^2 for every r at once (u_r only changes at its own step)
        den = ((us * us) @ c).clamp_min_(tiny)
        if impl == "triton":
            gpu_als.sweep(resid, c, us, vs, den)
            trace.append(objective())
            done += 1
            if _converged(trace, 1, tol):
                break
            continue
        if impl == "native":
            steps = native.sweep(resid, c, us, vs, den, track=track_steps)
            trace.extend(steps if track_steps else [objective()])
            done += 1
            if _converged(trace, k if track_steps else 1, tol):
                break
            continue
        neg_den = den.neg_()
        # While a sweep runs, updated rows hold (u~, -b): then the previous step's downdate -u~ b^T and this
        # step's add-back u_r v_r^T are one rank-2 product of two adjacent rows, with no copies
        folded = False  # True when the previous step's downdate is already in ``resid``
        for r in range(k - 1, -1, -1):
            if r == k - 1 or folded:
                resid.addr_(us[r], vs[r])  # resid is now E_r
            else:
                resid.addmm_(us[r:r + 2].T, vs[r:r + 2])
            torch.mul(c, resid, out=ce)
            torch.mv(ce.T, us[r], out=vs[r])
            vs[r].div_(neg_den[r])  # -b, Eq. 5
            torch.mul(vs[r], vs[r], out=b2)
            torch.addmv(den_u, c, b2, beta=0.0, alpha=-1.0, out=den_u)  # -sum_j C_ij b_j^2
            den_u.clamp_max_(-tiny)
            torch.mv(ce, vs[r], out=us[r])
            us[r].div_(den_u)  # u~, Eq. 6
            folded = track_steps
            if track_steps:
                resid.addr_(us[r], vs[r])
                trace.append(objective())
        if not folded:
            resid.addr_(us[0], vs[0])
        vs.neg_()  # rows back to (u~, b)
        done += 1
        if not track_steps:
            trace.append(objective())
        if _converged(trace, k if track_steps else 1, tol):
            break
    nu, nv = torch.linalg.vector_norm(us, dim=1), torch.linalg.vector_norm(vs, dim=1)
    live = (nu > 0) & (nv > 0)  # a component the weights drove to zero gets weight 0 and any unit direction
    sg = torch.where(live, nu * nv, torch.zeros_like(nu))
    us = torch.where(live[:, None], us / torch.where(live, nu, 1.0)[:, None], u.to(dtype).T)
    vs = torch.where(live[:, None], vs / torch.where(live, nv, 1.0)[:, None], vh.to(dtype))
    order = torch.argsort(sg, descending=True)
    return ALSResult(u=us[order].T.contiguous(), sigma=sg[order], vh=vs[order], objective=trace, sweeps=done)


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Triton is installed and its kernels reproduce the torch reference sweep here (checked once a process)."""
    if gpu_als.checked() is not None:
        return bool(gpu_als.checked())
    try:
        gpu_als.build()
        device = torch.device(device)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(37, 29, generator=g, dtype=torch.float64)
        c = 1.0 + torch.rand(37, 29, generator=g, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = 5
        ref = als_sweep(w, c, u[:, :k], s[:k], vh[:k], backend="torch")
        got = als_sweep(w.to(device), c.to(device), u[:, :k].to(device), s[:k].to(device), vh[:k].to(device),
                        backend="triton")
        ok = torch.allclose(got.sigma.cpu().double(), ref.sigma.double(), rtol=1e-3, atol=1e-4)
        return gpu_als.record_check(ok, None if ok else "the Triton ALS kernels disagree with the torch reference")
    except Exception as exc:  # noqa: BLE001 - any failure to build or run means: use the torch path
        return gpu_als.record_check(False, f"{type(exc).__name__}: {exc}")
