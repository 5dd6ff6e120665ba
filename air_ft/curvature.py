"""The output side of the error: the output-gradient Gram, two-sided whitening and global rank allocation.

Sections 12 and 13 of docs/method.md. The input side (the Gram of a layer's inputs, its square root ``S``) is
:mod:`air_ft.linalg`'s; here ``H``, the Gram of the gradient at a layer's output over the calibration tokens, weights
the error by how much the loss reacts to each output direction: ``tr(H dW G dW^T)``, the Kronecker-factored
(empirical Fisher) estimate of the loss increase. Pure math on tensors, nothing of configs or models.
"""

from __future__ import annotations

import math

import torch

from air_ft.errors import WhiteningError
from air_ft.linalg import truncated_svd, whitening_factor

__all__ = ["output_factor", "output_weighted_svd", "from_output_side", "loss_spectrum", "allocate_ranks"]


def output_factor(gram: torch.Tensor, weight: float, eps: float = 0.0,
                  kind: str = "cholesky") -> tuple[torch.Tensor, str]:
    """The output side of the two-sided whitening (docs/method.md section 6): ``L`` with
    ``L L^T = H_w = (1 - w) I + w H / mean(diag H)``, ``H`` the Gram of the layer's output gradient.

    The normalization makes ``w`` mean the same for every layer (the gradient's scale is arbitrary); ``w = 0``
    gives ``L = I``, the input-only problem. ``H_w`` is positive definite for ``w < 1``; at ``w = 1`` the
    whitening ladder of :func:`whitening_factor` damps a singular ``H``.

    Raises:
        WhiteningError: ``H`` holds NaN/Inf, or is zero while ``w > 0`` (no gradient reached the layer).
    """
    h = gram.to(torch.float64)
    m = h.shape[0]
    eye = torch.eye(m, dtype=torch.float64, device=h.device)
    if weight == 0:
        return eye, "identity"
    if not torch.isfinite(h).all():
        raise WhiteningError("output-gradient Gram contains NaN or Inf: the calibration backward overflowed; use "
                             "float32 calibration (dtype=float32) or set output_weight: 0")
    scale = float(torch.diagonal(h).mean())
    if not scale > 0:
        raise WhiteningError("output-gradient Gram is zero: no loss gradient reached this layer during calibration; "
                             "set output_weight: 0 or exclude the layer (exclude regex)")
    return whitening_factor((1.0 - weight) * eye + (weight / scale) * h, eps, kind)


def output_weighted_svd(wp: torch.Tensor, lf: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """The rank-``k`` ``A`` minimizing ``||L^T (W' - A)||_F`` (``W' = W S``, the whitened weight), in SVD form.

    ``L`` is invertible, so ``B = L^T A`` ranges over every rank-``k`` matrix: ``B*`` is the truncated SVD of
    ``L^T W'`` (Eckart-Young) and ``A* = L^{-T} B*`` (:func:`from_output_side`), returned with orthonormal ``U`` and
    ``Vh`` so that AIR's ALS can start from it and :func:`back_project` splits it as any other solution. ``L = I``
    gives the truncated SVD of ``W'`` itself.
    """
    return from_output_side(lf, *truncated_svd(lf.T.to(wp.dtype) @ wp, k))


def from_output_side(lf: torch.Tensor, ub: torch.Tensor, sb: torch.Tensor, vhb: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L^{-T} U_B diag(sigma_B) Vh_B`` in SVD form (a QR of ``L^{-T} U_B diag(sigma_B)`` and an SVD of its
    ``k x k`` triangle): a rank-``k`` matrix of the two-sided coordinates ``L^T W S`` taken back to ``W S``."""
    lt = lf.T.to(ub.dtype)
    if torch.equal(lt, lt.triu()):
        a = torch.linalg.solve_triangular(lt, ub * sb, upper=True)
    else:
        a = torch.linalg.solve(lt, ub * sb)
    q, r = torch.linalg.qr(a)
    ur, sr, vhr = torch.linalg.svd(r)
    return q @ ur, sr, vhr @ vhb


def loss_spectrum(w: torch.Tensor, s: torch.Tensor, ograd: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The loss-weighted energy of each singular direction of a layer, largest first (docs/method.md section 13).

    ``sigma_i^2`` of ``L^T W S``, ``S S^T = G`` the input Gram and ``L L^T = H`` the output-gradient Gram left
    unnormalized: truncating at rank ``k`` costs ``sum_{i > k} sigma_i^2 = tr(H dW G dW^T)``, the Gauss-Newton
    (empirical Fisher) estimate of the loss increase, in the same units for every layer of a model, so directions of
    different layers can be ranked against each other.
    """
    lf, _ = whitening_factor(ograd, eps)
    return torch.linalg.svdvals(lf.T @ w.to(torch.float64) @ s.to(torch.float64)).square()


def allocate_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                   uniform: dict[str, int | None], floor: float = 0.5, ceiling: float = 2.0,
                   multiple: int = 1) -> dict[str, int | None]:
    """Ranks chosen across all layers under the parameter budget of ``uniform`` (docs/method.md section 13).

    The budget is what the uniform ranks store, ``sum_l k_l (m_l + n_l)``. Every layer starts at its floor,
    ``floor * k_l`` (rounded up to ``multiple``); the remaining budget goes, ``multiple`` directions at a time, to the
    directions of highest energy per parameter, ``sum sigma_i^2 / (multiple (m + n))``, up to a layer's ceiling,
    ``ceiling * k_l`` and never so high that factoring stops saving parameters. A layer's energies decrease, so each
    layer receives a prefix of its directions; the greedy choice is the optimum of this knapsack among layers of one
    shape and misses the fractional optimum by less than one unit's energy overall. Layers that ``uniform`` keeps
    dense (``None``) stay dense.

    Args:
        spectra: layer -> energies ``sigma_i^2`` (decreasing), from :func:`loss_spectrum`.
        shapes: layer -> ``(m, n)``.
        uniform: layer -> uniform rank at the target retention (:func:`rank_for_retention`), or None.
        floor, ceiling: bounds on a layer's rank as multiples of its uniform rank (``0 < floor <= 1 <= ceiling``).
        multiple: ranks stay multiples of this (GPU kernels).
    """
    if not 0 < floor <= 1 <= ceiling:
        raise ValueError(f"rank floor and ceiling must satisfy 0 < floor <= 1 <= ceiling, got {floor}, {ceiling}")
    layers = [n for n, k in uniform.items() if k is not None]
    budget = sum(uniform[n] * sum(shapes[n]) for n in layers)
    ranks: dict[str, int | None] = dict(uniform)
    units = []  # (energy per parameter, position in its layer, layer, cost)
    for name in layers:
        m, n = shapes[name]
        top = (m * n - 1) // (m + n)  # the largest rank that still saves parameters
        low = min(top, max(multiple, math.ceil(floor * uniform[name] / multiple) * multiple))
        high = max(low, min(top, int(ceiling * uniform[name]) // multiple * multiple))
        ranks[name] = low
        budget -= low * (m + n)
        energy = spectra[name].to(torch.float64)
        for start in range(low, high, multiple):
            gain = float(energy[start:start + multiple].sum())
            units.append((gain / (multiple * (m + n)), start, name, multiple * (m + n)))
    if budget < 0:
        raise ValueError("the rank floors alone exceed the parameter budget; lower the floor")
    units.sort(key=lambda u: (-u[0], u[1]))  # ties go round the layers, not all to the first
    for _, _, name, cost in units:
        if cost <= budget:
            ranks[name] += multiple
            budget -= cost
    return ranks
