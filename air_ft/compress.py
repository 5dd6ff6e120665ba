"""The compression stage: calibrate once, then factor every target layer with one of five methods.

Reads top to bottom: validate -> choose layers and ranks -> calibration statistics (cached) -> per layer:
factor (pure math in :mod:`air_ft.linalg`) and swap in a :class:`~air_ft.modeling.LowRankLinear`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from air_ft import linalg
from air_ft.assets import cache_root
from air_ft.calibration import (
    WHITENED,
    CalibrationStats,
    calibrate,
    load_stats,
    model_fingerprint,
    save_stats,
    stats_key,
)
from air_ft.config import CompressConfig, RecipeError, build_dataclass
from air_ft.data import sample_windows
from air_ft.modeling import LowRankLinear, count_parameters, find_targets, prepare_model, set_module

__all__ = ["compress", "METHOD_FUNCTIONS", "plan_ranks"]


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


def _whitened(w, layer, cfg):
    s, rung = layer["whitening"]
    return w @ s, s, rung


def _svdllm(w, k, layer, cfg):
    wp, s, rung = _whitened(w, layer, cfg)
    u, sig, vh = linalg.truncated_svd(wp, k)
    return (*linalg.back_project(u, sig, vh, s), {"rung": rung})


def _air(w, k, layer, cfg):
    wp, s, rung = _whitened(w, layer, cfg)
    u, sig, vh = linalg.truncated_svd(wp, k)
    extra = {"rung": rung}
    if cfg.delta > 0:
        imap = linalg.normalize_influence(layer[cfg.influence], cfg.normalization, cfg.max_ratio)
        c = 1.0 + cfg.delta * imap.to(wp.device)
        dtype = torch.float64 if cfg.als_dtype == "float64" else torch.float32
        res = linalg.als_sweep(wp, c, u, sig, vh, sweeps=cfg.sweeps, tol=cfg.tol, dtype=dtype,
                               backend=cfg.als_backend)
        u, sig, vh = res.u.to(wp.dtype), res.sigma.to(wp.dtype), res.vh.to(wp.dtype)
        extra.update(objective_start=res.objective[0], objective_end=res.objective[-1], sweeps=res.sweeps)
    return (*linalg.back_project(u, sig, vh, s), extra)


METHOD_FUNCTIONS = {"svd": _svd, "asvd": _asvd, "fwsvd": _fwsvd, "svdllm": _svdllm, "air": _air}
NEEDS_GRAM = {"asvd", "svdllm", "air"}
NEEDS_INFLUENCE = {"fwsvd", "air"}


def plan_ranks(targets: dict[str, nn.Linear], retention: float, multiple: int = 1) -> dict[str, int | None]:
    """Rank per layer from its real shape (GQA k/v included), rounded down to ``multiple``; ``None`` keeps the layer
    dense."""
    return {name: linalg.rank_for_retention(mod.out_features, mod.in_features, retention, multiple)
            for name, mod in targets.items()}


def get_stats(model: nn.Module, tok, texts: list[str], targets: dict[str, nn.Linear], cfg: CompressConfig,
              influence: bool) -> CalibrationStats:
    """Calibration statistics from the disk cache, or computed (and cached) now.

    ``cfg.influence == "fisher_whitened"`` adds a second pass that measures the Fisher of the whitened weight with
    the whitening factors of the first pass's Grams (the first pass then needs no backward).
    """
    windows = sample_windows(tok, texts, cfg.num_samples, cfg.seq_len, cfg.seed)
    whitened = influence and cfg.method == "air" and cfg.influence == WHITENED
    fingerprint = model_fingerprint(model) if cfg.cache else None  # hashes every parameter byte: once

    def cached(flag, compute):
        path = stats_dir() / stats_key(fingerprint, windows, list(targets), flag) if cfg.cache else None
        stats = load_stats(path) if path is not None else None
        if stats is None and flag is False and path is not None:  # statistics with influence also hold the Grams
            stats = load_stats(stats_dir() / stats_key(fingerprint, windows, list(targets), True))
        if stats is None:
            stats = compute()
            if path is not None:
                save_stats(stats, path)
        return stats

    base = cached(influence and not whitened, lambda: calibrate(
        model, windows, targets, influence=influence and not whitened, batch_size=cfg.batch_size,
        progress=cfg.progress))
    if whitened:
        def second_pass() -> CalibrationStats:
            factors = {}
            for group in set(base.group_of.values()):
                factors[group] = linalg.whitening_factor(base.grams[group], cfg.eps, cfg.whitening)[0]
            return calibrate(model, windows, targets, influence=True, batch_size=cfg.batch_size,
                             progress=cfg.progress, whitening={n: factors[g] for n, g in base.group_of.items()})

        extra = cached(f"{WHITENED}:{cfg.whitening}:{cfg.eps}", second_pass)
        base.influence[WHITENED] = extra.influence[WHITENED]
        base.seconds += extra.seconds
        base.cached = base.cached and extra.cached
    return base


def compress(model: nn.Module, tok, texts: list[str] | None = None, method: str = "air", retention: float = 0.6,
             num_samples: int = 64, seq_len: int = 512, seed: int = 0, stats: CalibrationStats | None = None,
             **options) -> dict:
    """Compress every target linear of ``model`` in place to rank ``k`` factors; return what was done.

    Args:
        model: a causal LM whose projections are ``nn.Linear``.
        tok: its tokenizer.
        texts: raw calibration strings (windows are drawn from them, seeded); not needed for ``svd`` or when
            ``stats`` is given.
        method: ``svd`` | ``asvd`` | ``fwsvd`` | ``svdllm`` | ``air``.
        retention: fraction of the compressed layers' parameters kept.
        stats: precomputed :class:`CalibrationStats` (skips calibration; benchmarks share one).
        **options: any other :class:`~air_ft.config.CompressConfig` field (delta, influence, normalization,
            sweeps, tol, include, exclude, als_dtype, als_backend, eps, batch_size, cache, progress, device).

    Returns:
        dict with ``ranks``, ``rungs``, per-layer ``objective`` (AIR), parameter counts, timings.
    """
    device = options.pop("device", None)
    prepare_model(model)
    if method == "acip":
        raise RecipeError("method 'acip' trains masks and LoRA: use air_ft.acip_fit(model, tok, texts, ...)"
                          ".materialize(retention), or air-ft compress / run with compress.method=acip")
    cfg = build_dataclass(CompressConfig, dict(method=method, retention=retention, num_samples=num_samples,
                                               seq_len=seq_len, seed=seed, **options), "compress")
    targets = find_targets(model, cfg.include, cfg.exclude)
    if not targets:
        raise RecipeError("no nn.Linear layer matches the include/exclude patterns "
                          f"(include={cfg.include}, exclude={cfg.exclude}); widen include or drop exclude. "
                          "Layers must be torch.nn.Linear (GPT-2's Conv1D is not).")
    ranks = plan_ranks(targets, cfg.retention, cfg.rank_multiple)
    if all(k is None for k in ranks.values()):
        raise RecipeError(f"retention {cfg.retention} saves nothing on any selected layer (rank*(m+n) >= m*n); "
                          "choose a lower retention")
    need_gram, need_infl = cfg.method in NEEDS_GRAM, cfg.method in NEEDS_INFLUENCE and not (
        cfg.method == "air" and cfg.delta == 0)
    if (need_gram or need_infl) and stats is None:
        if not texts:
            raise RecipeError(f"method {cfg.method!r} needs calibration texts (a non-empty list of strings)")
        stats = get_stats(model, tok, texts, targets, cfg, influence=need_infl)
    if need_infl and cfg.method == "air" and cfg.influence not in stats.influence:
        raise RecipeError(f"calibration statistics hold no {cfg.influence!r} influence; recalibrate")
    params_before = count_parameters(model)
    math_device = torch.device(device) if device else next(model.parameters()).device
    whitening_cache: dict[str, tuple[torch.Tensor, str]] = {}
    info: dict = {"method": cfg.method, "retention": cfg.retention, "ranks": {}, "rungs": {}, "objective": {},
                  "config": {k: v for k, v in vars(cfg).items()}}
    t0 = time.perf_counter()
    linear_before = linear_after = 0
    for name, mod in tqdm(targets.items(), desc=f"compress ({cfg.method})", disable=not cfg.progress):
        k = ranks[name]
        m, n = mod.weight.shape
        linear_before += m * n + (mod.bias.numel() if mod.bias is not None else 0)
        info["ranks"][name] = k
        if k is None:
            linear_after += m * n + (mod.bias.numel() if mod.bias is not None else 0)
            continue
        layer = _layer_inputs(name, stats, cfg, math_device, whitening_cache)
        w = mod.weight.detach().to(math_device, torch.float64)
        uf, vf, extra = METHOD_FUNCTIONS[cfg.method](w, k, layer, cfg)
        if not (torch.isfinite(uf).all() and torch.isfinite(vf).all()):
            raise linalg.WhiteningError(f"factors of {name!r} are not finite; raise eps (e.g. eps=1e-6) or use "
                                        "more calibration samples")
        bias = mod.bias.detach() if mod.bias is not None else None
        new = LowRankLinear.from_factors(uf, vf, bias, dtype=mod.weight.dtype, device=mod.weight.device)
        set_module(model, name, new)
        linear_after += k * (m + n) + (bias.numel() if bias is not None else 0)
        if "rung" in extra:
            info["rungs"][name] = extra["rung"]
        if "objective_start" in extra:
            info["objective"][name] = [extra["objective_start"], extra["objective_end"]]
    info.update(
        compression_seconds=time.perf_counter() - t0,
        calibration_seconds=stats.seconds if stats is not None else 0.0,
        calibration_cached=bool(stats.cached) if stats is not None else False,
        calibration_tokens=stats.tokens if stats is not None else 0,
        linear_params_before=linear_before, linear_params_after=linear_after,
        retention_actual=linear_after / linear_before,
        model_params_before=params_before, model_params_after=count_parameters(model),
    )
    model.config.air_ft = {"method": cfg.method, "retention": cfg.retention,
                           "ranks": {k: v for k, v in info["ranks"].items() if v is not None}}
    return info


def _layer_inputs(name: str, stats: CalibrationStats | None, cfg: CompressConfig, device: torch.device,
                  whitening_cache: dict) -> dict:
    """The statistics one method call needs for layer ``name`` (whitening shared by the layers of one input)."""
    if stats is None:
        return {}
    group = stats.group_of[name]
    out = {"abs_sum": stats.abs_sum[group].to(device), "tokens": stats.tokens}
    if cfg.method in ("svdllm", "air"):
        if group not in whitening_cache:
            whitening_cache.clear()  # layers of one group are adjacent; keep memory bounded
            whitening_cache[group] = linalg.whitening_factor(stats.grams[group].to(device), cfg.eps,
                                                                cfg.whitening)
        out["whitening"] = whitening_cache[group]
    for sig, maps in stats.influence.items():
        if name in maps:
            out[sig] = maps[name].to(device)
    return out


def stats_dir() -> Path:
    """Where calibration statistics are cached."""
    return cache_root() / "stats"
