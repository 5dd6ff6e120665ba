"""The compression methods, one entry each: what a method needs from calibration and how it factors a weight.

Everything that depends on the method reads :data:`METHODS`: the recipe's validation, the statistics that
calibration collects, the factor call in :mod:`air_ft.compress`, which stages of a study train, and the report's
labels. Adding a method is one :class:`Method` entry here (and, for a one-shot method, its factor function).

A factor function maps a float64 weight ``W`` (``m x n``), a rank ``k``, the layer's statistics and the compress
config to factors ``U`` (``m x k``) and ``V`` (``k x n``) with ``W ~ U V``, plus a dict of per-layer records
(``rung``, ``objective_start`` / ``objective_end``, ``sweeps``). The math itself lives in :mod:`air_ft.linalg`.
The statistics a factor function reads: ``whitening`` (``(S, rung)``), ``output`` (``(L, rung)``, only with
``output_weight > 0``), the influence maps by signal name, ``abs_sum`` and ``tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from air_ft import curvature, linalg
from air_ft.calibration import OGRAD  # the output-gradient Gram, collected in every backward pass

__all__ = ["Method", "METHODS", "LEVERS_OFF", "method", "lever", "neutral_settings"]

FactorFn = Callable[[torch.Tensor, int, dict, Any], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass(frozen=True)
class Method:
    """One compression method.

    Attributes:
        name: the recipe's ``compress.method`` value and the prefix of a study's row names.
        label: how reports name it.
        factor: the one-shot factor function; ``None`` for a method that trains (:attr:`trains`).
        needs_gram: it reads each input's Gram matrix (whitening) or its mean absolute activation (ASVD).
        whitened: its factors live in whitened coordinates: the Gram's square root ``S`` is computed per input.
        influence: ``cfg -> signal`` the influence map it reads for that config (``None``: no backward pass).
        trains: it optimizes on training text while compressing (ACIP-style): the study runs it on the main
            process only, and its training tokens count against a recovered row's LoRA budget.
        calibrates: it reads calibration text at all (plain SVD does not).
        sweeps: it refines its start with AIR's ALS sweep on an influence map (``als_output_side`` applies).
        presets: the lever settings (keys of :data:`LEVERS_OFF`) it uses where a recipe leaves them unset (``None``),
            each a value or a function of the compress section; every other lever is off. The published methods
            have none; changing them needs a new ``revision``.
        revision: raised when the method's code changes what it produces for the same settings (0: never yet);
            it keys the study's stages, so that a study redoes the method's rows instead of reusing stale ones.
    """

    name: str
    label: str
    factor: FactorFn | None = None
    needs_gram: bool = False
    whitened: bool = False
    influence: Callable[[Any], str | None] = lambda cfg: None
    trains: bool = False
    calibrates: bool = True
    sweeps: bool = False
    presets: dict = field(default_factory=dict)
    revision: int = 0


def _svd(w, k, layer, cfg):
    u, s, vh = linalg.truncated_svd(w, k)
    return (*linalg.back_project(u, s, vh), {})


def _asvd(w, k, layer, cfg):
    # s_j = mean_t |x_tj| ^ alpha; SVD of W diag(s); V is unscaled afterwards
    scale = (layer["abs_sum"] / layer["tokens"]).clamp_min(1e-8).pow(cfg.asvd_alpha)
    u, s, vh = linalg.truncated_svd(w * scale, k)
    uf, vf = linalg.back_project(u, s, vh)
    return uf, vf / scale, {}


def _fwsvd(w, k, layer, cfg):
    # row-wise Fisher f_i = sqrt(sum_j sum_d g_ij^2); SVD of diag(f) W; U is unscaled afterwards
    f = layer["fisher"].to(w.dtype).sum(1).sqrt()
    f = f / f.mean() if f.mean() > 0 else torch.ones_like(f)
    f = f.clamp_min(1e-6)
    u, s, vh = linalg.truncated_svd(f[:, None] * w, k)
    uf, vf = linalg.back_project(u, s, vh)
    return uf / f[:, None], vf, {}


def _start(wp, k, layer):
    """The rank-``k`` solution in whitened coordinates: the truncated SVD of ``W S``, or with ``output_weight`` the
    two-sided one (the error seen through the output-gradient Gram as well)."""
    if "output" in layer:
        return curvature.output_weighted_svd(wp, layer["output"][0], k)
    return linalg.truncated_svd(wp, k)


def _svdllm(w, k, layer, cfg):
    s, rung = layer["whitening"]
    u, sig, vh = _start(w @ s, k, layer)
    return (*linalg.back_project(u, sig, vh, s), {"rung": rung})


def _air(w, k, layer, cfg):
    s, rung = layer["whitening"]
    wp = w @ s
    two_sided = lever(cfg, "als_output_side") and "output" in layer and cfg.delta > 0
    if two_sided:  # sweep in L^T W S, where the two-sided start is the truncated SVD
        lf = layer["output"][0]
        wp = lf.T.to(wp.dtype) @ wp
        u, sig, vh = linalg.truncated_svd(wp, k)
    else:
        u, sig, vh = _start(wp, k, layer)
    extra: dict = {"rung": rung}
    if cfg.delta > 0:
        imap = linalg.normalize_influence(layer[cfg.influence], cfg.normalization, cfg.max_ratio)
        c = 1.0 + cfg.delta * imap.to(wp.device)
        dtype = torch.float64 if cfg.als_dtype == "float64" else torch.float32
        res = linalg.als_sweep(wp, c, u, sig, vh, sweeps=cfg.sweeps, tol=cfg.tol, dtype=dtype,
                               backend=cfg.als_backend)
        u, sig, vh = res.u.to(wp.dtype), res.sigma.to(wp.dtype), res.vh.to(wp.dtype)
        extra.update(objective_start=res.objective[0], objective_end=res.objective[-1], sweeps=res.sweeps)
    if two_sided:
        u, sig, vh = curvature.from_output_side(lf, u, sig, vh)
    return (*linalg.back_project(u, sig, vh, s), extra)


def _output_influence(cfg) -> str | None:
    return OGRAD if lever(cfg, "output_weight") > 0 else None  # the output-gradient Gram needs a backward pass


def _air_influence(cfg) -> str | None:
    # delta = 0 is SVD-LLM(W): no influence map needed (every backward pass also holds the output Gram)
    return cfg.influence if cfg.delta > 0 else _output_influence(cfg)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("svd", "SVD", _svd, calibrates=False),
    Method("asvd", "ASVD", _asvd, needs_gram=True),
    Method("fwsvd", "FWSVD", _fwsvd, influence=lambda cfg: "fisher"),
    Method("svdllm", "SVD-LLM(W)", _svdllm, needs_gram=True, whitened=True, influence=_output_influence),
    Method("air", "AIR", _air, needs_gram=True, whitened=True, influence=_air_influence, sweeps=True),
    # the default: AIR with every lever that won on validation (benchmarks/README.md, "Compression levers")
    Method("air2s", "AIR-2S", _air, needs_gram=True, whitened=True, influence=_air_influence, sweeps=True,
           presets={"output_weight": 0.5, "rank_allocation": "global", "als_output_side": True,
                    "refine_steps": lambda cfg: 16 if cfg.sequential else 0}),  # refinement streams sequentially
    # revision 1: the mask phase as the reference runs it (no clip, no cap, the optimizer carried into the post-tune,
    # disjoint blocks, the merged LoRA in the stop ratio)
    Method("acip", "ACIP-style", None, trains=True, revision=1),
)}


LEVERS_OFF = {"output_weight": 0.0, "rank_allocation": "uniform", "refine_steps": 0, "als_output_side": False,
              "influence_samples": 0}
"""The compress settings that a method may preset (:attr:`Method.presets`), at their values that turn them off."""


def lever(cfg, name: str):
    """Lever ``name`` of a compress section ``cfg``: its value, else its method's preset, else off."""
    value = getattr(cfg, name)
    if value is not None:
        return value
    preset = METHODS[cfg.method].presets.get(name, LEVERS_OFF[name])
    return preset(cfg) if callable(preset) else preset


def neutral_settings(entry: Method) -> dict:
    """The compress settings ``entry`` does not read, at their values that leave every result as it was: a study
    sets them on that method's rows (so one study compares every method with a lever on), and a direct call that sets
    them otherwise is refused."""
    out: dict = {}
    if not entry.whitened:  # no whitened coordinates: nothing for an output side to weight
        out["output_weight"] = LEVERS_OFF["output_weight"]
    if entry.trains or not entry.calibrates:  # ACIP-style learns its own ranks and factors; plain SVD streams no
        out["rank_allocation"] = LEVERS_OFF["rank_allocation"]  # calibration data to rank layers or refine blocks on
        out["refine_steps"] = LEVERS_OFF["refine_steps"]
    if not entry.sweeps:  # no ALS sweep whose coordinates to choose
        out["als_output_side"] = LEVERS_OFF["als_output_side"]
    return out


def method(name: str) -> Method:
    """The entry called ``name``; a :class:`~air_ft.errors.RecipeError` naming the choices otherwise."""
    from air_ft.errors import RecipeError

    if name not in METHODS:
        raise RecipeError(f"method {name!r} is unknown; choose one of {tuple(METHODS)}")
    return METHODS[name]
