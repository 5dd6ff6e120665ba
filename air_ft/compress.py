"""The compression stage: calibrate, then factor every target layer with one of five methods.

Reads top to bottom: validate -> choose layers and ranks -> calibration statistics, streamed one decoder block at
a time (cached per block) -> per block and layer: factor (pure math in :mod:`air_ft.linalg`) and swap in a
:class:`~air_ft.modeling.LowRankLinear`. Memory holds one block's statistics, whatever the depth.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from air_ft import curvature, dist, linalg
from air_ft.calibration import (
    OGRAD,
    WHITENED,
    CalibrationStats,
    calibrate,
    load_stats,
    model_fingerprint,
    save_stats,
    stats_dir,
    stats_key,
)
from air_ft.checkpoint import record_factoring
from air_ft.config import CompressConfig, build_dataclass
from air_ft.data import sample_windows
from air_ft.errors import RecipeError, WhiteningError
from air_ft.evaluate import window_nll
from air_ft.methods import METHODS
from air_ft.modeling import LowRankLinear, count_parameters, find_targets, prepare_model, set_module
from air_ft.streaming import Records, StreamCompressor, StreamOutcome

__all__ = ["compress", "plan_ranks", "CompressResult"]


@dataclass
class CompressResult(Mapping):
    """What :func:`compress` did.

    Attributes:
        method: the method's name (:data:`air_ft.methods.METHODS`).
        retention: the retention asked for.
        ranks: layer name -> rank (``None``: the layer stayed dense, factoring it would save nothing).
        retention_actual: parameters of the compressed linear layers after / before (biases included).
        linear_params_before, linear_params_after: those two counts.
        model_params_before, model_params_after: whole-model parameter counts.
        rungs: layer -> the damping rung its whitening needed (``cholesky``, ``damped(eps)``, ``eigen``).
        objective: layer -> AIR's weighted objective (Eq. 4) ``[before the sweep, after]``.
        config: the :class:`~air_ft.config.CompressConfig` it ran with, as a dict.
        calibration_seconds, compression_seconds: wall time of the statistics and of the factoring.
        calibration_tokens: tokens the calibration read; calibration_cached: every statistic came from the cache.
        stream: the block streaming's record (blocks, groups, influence passes, peak memory), when it streamed.
        extra: method-specific records (ACIP-style: ``retention_reached``, ``mask_steps``, ``train_tokens``,
            ``acip``), flattened into :meth:`to_json`.

    It also reads as the dict that :func:`compress` returned before it had a type (``result["ranks"]``); that
    access is deprecated in favour of the attributes.
    """

    method: str
    retention: float
    ranks: dict
    retention_actual: float = 0.0
    linear_params_before: int = 0
    linear_params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    rungs: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    calibration_seconds: float = 0.0
    compression_seconds: float = 0.0
    calibration_tokens: int = 0
    calibration_cached: bool = False
    stream: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self, objective: bool = True) -> dict:
        """A JSON-ready dict: every attribute, ``extra`` flattened in, ``stream`` only when it streamed."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "stream")}
        if self.stream is not None:
            out["stream"] = self.stream
        if not objective:
            del out["objective"]
        return {**out, **self.extra}

    def __getitem__(self, key: str):
        warnings.warn("reading compress()'s result as a dict is deprecated: use its attributes "
                      f"(result.{key}) or result.to_json()", DeprecationWarning, stacklevel=2)
        return self.to_json()[key]

    def __iter__(self):
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


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
    cfg = cfg.resolved()
    windows = sample_windows(tok, texts, cfg.num_samples, cfg.seq_len, cfg.seed)
    whitened = influence and METHODS[cfg.method].influence(cfg) == WHITENED
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

    few = cfg.influence_samples  # the backward reads the first windows alone (whole batches), as the stream does
    sub = windows[:-(-few // cfg.batch_size) * cfg.batch_size] if few else windows
    one_pass = influence and not whitened and not few  # Grams and unwhitened maps from one pass over every window
    base = cached(one_pass, lambda: calibrate(model, windows, targets, influence=one_pass, batch_size=cfg.batch_size,
                                              progress=cfg.progress))
    if influence and not whitened and few:
        extra = cached(f"maps:first{few}", lambda: calibrate(model, sub, targets, influence=True, grams=False,
                                                             batch_size=cfg.batch_size, progress=cfg.progress))
        base.influence, base.seconds = extra.influence, base.seconds + extra.seconds
        base.cached = base.cached and extra.cached
    if whitened:
        def second_pass() -> CalibrationStats:
            factors = {}
            for group in set(base.group_of.values()):
                factors[group] = linalg.whitening_factor(base.grams[group], cfg.eps, cfg.whitening)[0]
            return calibrate(model, sub, targets, influence=True, batch_size=cfg.batch_size,
                             progress=cfg.progress, whitening={n: factors[g] for n, g in base.group_of.items()})

        extra = cached(f"{WHITENED}:{cfg.whitening}:{cfg.eps}" + (f":first{few}" if few else ""), second_pass)
        base.influence[WHITENED] = extra.influence[WHITENED]
        base.influence[OGRAD] = extra.influence[OGRAD]
        base.seconds += extra.seconds
        base.cached = base.cached and extra.cached
    return base


def compress(model: nn.Module, tok, texts: list[str] | None = None, method: str = "air2s", retention: float = 0.6,
             num_samples: int = 64, seq_len: int = 512, seed: int = 0, stats: CalibrationStats | None = None,
             windows: torch.Tensor | None = None, on_block: Callable[[int, list[str]], None] | None = None,
             **options) -> CompressResult:
    """Compress every target linear of ``model`` in place to rank ``k`` factors; return what was done.

    Calibration and compression stream through the decoder blocks (:func:`_stream`): statistics memory is one
    block's (or one influence pass's, ``stats_memory_gb``), whatever the depth. Under ``accelerate launch`` with
    several processes, calibration batches are sharded over the processes and each block's matrices are factored
    in parallel; every process ends with the same model.

    Args:
        model: a causal LM whose projections are ``nn.Linear``.
        tok: its tokenizer.
        texts: raw calibration strings (windows are drawn from them, seeded); not needed for ``svd`` or when
            ``stats`` is given.
        method: ``air2s`` (the default: AIR with the output side, global ranks, the two-sided sweep and block
            refinement) | ``svd`` | ``asvd`` | ``fwsvd`` | ``svdllm`` | ``air`` (see ``air_ft.methods.METHODS``).
        retention: fraction of the compressed layers' parameters kept.
        stats: precomputed :class:`CalibrationStats` of every layer at once (the all-at-once reference path:
            skips calibration; benchmarks share one).
        windows: ``(N, T)`` calibration token ids to use as they are, instead of drawing ``num_samples`` windows
            of ``seq_len`` tokens from ``texts``.
        on_block: called as ``on_block(block, layer_names)`` once a decoder block's layers are factored and swapped
            in (``block`` -1 and every layer at once on the all-at-once path): progress for a caller, or a probe.
        **options: any other :class:`~air_ft.config.CompressConfig` field (delta, influence, normalization,
            sweeps, tol, include, exclude, als_dtype, als_backend, eps, batch_size, sequential, output_weight,
            rank_allocation, rank_floor, rank_ceiling, refine_steps, refine_lr, refine_lr_scale, refine_loss,
            stats_memory_gb, checkpointing, cache, progress, device).

    Returns:
        A :class:`CompressResult`: ranks, rungs, per-layer ``objective`` (AIR), parameter counts, timings and,
        for the streamed path, ``stream`` (blocks, influence passes, peak statistics / device / host memory, and
        ``refine`` with block refinement); with ``rank_allocation: global`` also ``extra["uniform_ranks"]`` and
        ``extra["allocation_seconds"]`` (counted in ``calibration_seconds``).
    """
    device = options.pop("device", None)
    prepare_model(model)
    dist.init_from_env()
    if method in METHODS and METHODS[method].trains:
        raise RecipeError(f"method {method!r} trains masks and LoRA: use air_ft.acip_fit(model, tok, texts, ...)"
                          ".materialize(retention), or air-ft compress / run with compress.method=acip")
    cfg = build_dataclass(CompressConfig, dict(method=method, retention=retention, num_samples=num_samples,
                                               seq_len=seq_len, seed=seed, **options), "compress").resolved()
    if cfg.delta == "auto":
        return _auto_delta(model, tok, texts, windows, stats, cfg, device, on_block)
    targets = find_targets(model, cfg.include, cfg.exclude)
    if not targets:
        raise RecipeError("no nn.Linear layer matches the include/exclude patterns "
                          f"(include={cfg.include}, exclude={cfg.exclude}); widen include or drop exclude. "
                          "Layers must be torch.nn.Linear (GPT-2's Conv1D is not).")
    ranks = plan_ranks(targets, cfg.retention, cfg.rank_multiple)
    if all(k is None for k in ranks.values()):
        raise RecipeError(f"retention {cfg.retention} saves nothing on any selected layer (rank*(m+n) >= m*n); "
                          "choose a lower retention")
    uniform = dict(ranks)
    entry = METHODS[cfg.method]
    need_gram, need_infl = entry.needs_gram, entry.influence(cfg) is not None
    if windows is not None and (windows.dim() != 2 or windows.dtype not in (torch.long, torch.int) or
                                windows.shape[1] < 2 or windows.shape[0] < 1):
        raise RecipeError(f"windows must be an (N, T) tensor of token ids with N >= 1 and T >= 2, got "
                          f"{tuple(windows.shape)} {windows.dtype}")
    if (need_gram or need_infl) and stats is None and not texts and windows is None:
        raise RecipeError(f"method {cfg.method!r} needs calibration texts (a non-empty list of strings)")
    if stats is not None and cfg.refine_steps > 0:
        raise RecipeError("refine_steps tunes each block while streaming the calibration windows; given statistics "
                          "skip that stream: pass texts or windows instead of stats, or set refine_steps: 0")
    for signal in (entry.influence(cfg) if need_infl else None, OGRAD if cfg.output_weight > 0 else None):
        if stats is not None and signal is not None and signal not in stats.influence:
            raise RecipeError(f"calibration statistics hold no {signal!r} influence; recalibrate")
    # what the backward measures, and the name its maps are cached under
    signal = entry.influence(cfg) if need_infl else None
    whitened, maps = signal == WHITENED, signal not in (None, OGRAD)  # OGRAD alone: no element-wise maps
    first = f"-first{cfg.influence_samples}" if cfg.influence_samples else ""  # maps of fewer windows: other maps
    kind = (f"influence-{WHITENED}+{OGRAD}-{cfg.whitening}-{cfg.eps}" if whitened
            else f"influence-wxg+fisher+{OGRAD}" if maps else f"influence-{OGRAD}") + first
    allocation_seconds = 0.0
    if cfg.rank_allocation == "global":
        if windows is None and stats is None:
            windows = sample_windows(tok, texts, cfg.num_samples, cfg.seq_len, cfg.seed)
        t0 = time.perf_counter()
        # with the disk cache, the pass measures what the compression's first (dense) group reads, which then
        # finds it on disk: one backward of the dense model in all, not two
        backward = (whitened, kind, maps) if need_infl and cfg.cache else (False, f"influence-{OGRAD}{first}", False)
        spectra = _loss_spectra(model, targets, uniform, windows, stats, cfg, device, backward)
        ranks = curvature.allocate_ranks(spectra, {n: tuple(m.weight.shape) for n, m in targets.items()}, uniform,
                                      cfg.rank_floor, cfg.rank_ceiling, cfg.rank_multiple)
        allocation_seconds = time.perf_counter() - t0
    params_before = count_parameters(model)
    # counted now: a layer's dense weight is released as soon as its factors replace it
    linear_before = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in targets.values())
    linear_after = sum((m.weight.numel() if ranks[n] is None else ranks[n] * sum(m.weight.shape))
                       + (m.bias.numel() if m.bias is not None else 0) for n, m in targets.items())
    math_device = torch.device(device) if device else next(model.parameters()).device
    t0 = time.perf_counter()
    if stats is not None or not (need_gram or need_infl):  # everything at once, from given statistics (or none)
        records = _factor_layers(model, targets, list(targets), ranks, stats, cfg, math_device, progress=cfg.progress)
        if on_block is not None:
            on_block(-1, list(targets))
        done = StreamOutcome(records, stats.seconds if stats is not None else 0.0, time.perf_counter() - t0,
                             stats.tokens if stats is not None else 0,
                             bool(stats.cached) if stats is not None else False, None)
    else:
        if windows is None:
            windows = sample_windows(tok, texts, cfg.num_samples, cfg.seq_len, cfg.seed)

        def factor(names: list[str], st: CalibrationStats) -> Records:
            return _factor_layers(model, targets, names, ranks, st, cfg, math_device)

        done = StreamCompressor(model, windows, targets, cfg, factor, need_gram, need_infl, whitened, kind,
                                ranks, on_block, maps=maps).run()
    record_factoring(model, cfg.method, cfg.retention)
    return CompressResult(
        method=cfg.method, retention=cfg.retention, ranks=dict(ranks), retention_actual=linear_after / linear_before,
        linear_params_before=linear_before, linear_params_after=linear_after, model_params_before=params_before,
        model_params_after=count_parameters(model), rungs=done.records.rungs, objective=done.records.objective,
        config=dict(vars(cfg)), calibration_seconds=done.calibration_seconds + allocation_seconds,
        compression_seconds=done.compression_seconds, calibration_tokens=done.calibration_tokens,
        calibration_cached=done.calibration_cached, stream=done.stream,
        extra={"uniform_ranks": uniform, "allocation_seconds": allocation_seconds}
        if cfg.rank_allocation == "global" else {})


def held_out_windows(n: int) -> torch.Tensor:
    """Which of ``n`` calibration windows ``delta: auto`` holds out: ``n // 8`` of them, every 7th (windows 7, 14,
    21, ...; the last one when fewer than 8). :func:`air_ft.data.sample_windows` draws the sources in turn, so window
    ``i`` comes from source ``i mod s``; a step of 7 walks through every residue of any ``s`` from 2 to 6 and 8, so
    the held-out windows take every source in turn and the fit windows keep the sources' balance (every 8th window
    would be one source's alone whenever ``s`` divides 8)."""
    if n < 2:
        raise RecipeError("delta: auto holds out calibration windows to choose delta and calibrates on the others: "
                          f"it needs num_samples >= 2, got {n}; raise num_samples or set delta to a number")
    held = torch.zeros(n, dtype=torch.bool)
    if n < 8:
        held[n - 1] = True
    else:
        held[7 * torch.arange(1, n // 8 + 1)] = True
    return held


def _auto_delta(model: nn.Module, tok, texts, windows, stats, cfg: CompressConfig, device, on_block
                ) -> CompressResult:
    """``delta: auto``: compress a copy of the dense model with each of ``cfg.delta_candidates`` from the dense
    model's statistics of the fit windows (the first candidate calibrates, the cache serves the others; no
    sequential statistics, no refinement: the cheap form of the method), keep the candidate with the lowest loss on
    the held-out windows (:func:`held_out_windows`; ties to the earlier candidate), then compress ``model`` as
    configured with it on the fit windows. The result's ``extra["delta_auto"]`` holds every candidate's loss."""
    if stats is not None:
        raise RecipeError("delta: auto compresses trial copies from calibration windows; pass texts or windows "
                          "instead of stats, or set delta to a number")
    if windows is None:
        if not texts:
            raise RecipeError(f"method {cfg.method!r} needs calibration texts (a non-empty list of strings)")
        windows = sample_windows(tok, texts, cfg.num_samples, cfg.seq_len, cfg.seed)
    held_mask = held_out_windows(windows.shape[0])
    fit, held = windows[~held_mask], windows[held_mask]
    options = {k: v for k, v in vars(cfg).items() if k not in ("delta", "delta_candidates")}
    trial_options = {**options, "sequential": False, "refine_steps": 0, "progress": False}
    losses: dict[float, float] = {}
    bar = tqdm(cfg.delta_candidates, desc="delta: auto", disable=not cfg.progress)
    for d in bar:
        trial = copy.deepcopy(model)
        compress(trial, tok, None, windows=fit, delta=float(d), device=device, **trial_options)
        losses[float(d)] = window_nll(trial, held, cfg.batch_size)[0]
        del trial
        bar.set_postfix(delta=d, loss=f"{losses[float(d)]:.4f}")
    chosen = min(losses, key=losses.get)
    result = compress(model, tok, None, windows=fit, delta=chosen, device=device, on_block=on_block, **options)
    result.extra["delta_auto"] = {"candidates": losses, "chosen": chosen, "fit_windows": int(fit.shape[0]),
                                  "held_out_windows": int(held.shape[0]),
                                  "trial": "dense-model statistics, no sequential statistics, no refinement"}
    return result


def _loss_spectra(model: nn.Module, targets: dict[str, nn.Linear], uniform: dict, windows: torch.Tensor | None,
                  stats: CalibrationStats | None, cfg: CompressConfig, device,
                  backward: tuple[bool, str, bool]) -> dict[str, torch.Tensor]:
    """Every factored layer's loss-weighted energies (:func:`air_ft.curvature.loss_spectrum`), from the dense model's
    statistics: ``stats`` when given, else one streamed pass (Grams, then a backward for the output-gradient Grams;
    both cached on disk for later runs on the same data). Nothing is factored.

    ``backward = (whitened, kind, maps)``: what the backward measures and its cache name: what the compression
    that follows reads, which then reads it back instead of a second backward of the dense model, or (without
    influence or without the cache) ``(False, "influence-ograd...", False)``, the output-gradient Grams alone."""
    math_device = torch.device(device) if device else next(model.parameters()).device
    spectra: dict[str, torch.Tensor] = {}

    def spectrum(layer_names: list[str], st: CalibrationStats) -> Records:
        roots: dict[str, torch.Tensor] = {}
        for name in (n for n in layer_names if uniform.get(n) is not None):
            group = st.group_of[name]
            if group not in roots:
                roots[group] = linalg.whitening_factor(st.grams[group].to(math_device), cfg.eps, cfg.whitening)[0]
            w = targets[name].weight.detach().to(math_device, torch.float64)
            spectra[name] = curvature.loss_spectrum(w, roots[group], st.influence[OGRAD][name].to(math_device),
                                                 cfg.eps).cpu()
        return Records()

    if stats is not None:
        if OGRAD not in stats.influence:
            raise RecipeError("rank_allocation: global needs the output-gradient Grams ('ograd'), which these "
                              "calibration statistics do not hold; recalibrate with influence")
        spectrum(list(targets), stats)  # the callback skips the layers that stay dense
        return spectra
    dense = dataclasses.replace(cfg, sequential=False, refine_steps=0)  # ranked on the dense model's statistics
    whitened, kind, maps = backward
    StreamCompressor(model, windows, targets, dense, spectrum, True, True, whitened, kind, {}, resume=False,
                     maps=maps).run()
    return spectra


def _factor_layers(model: nn.Module, targets: dict[str, nn.Linear], names: list[str], ranks: dict,
                   stats: CalibrationStats | None, cfg: CompressConfig, device: torch.device,
                   progress: bool = False) -> Records:
    """Factor the layers ``names`` with ``cfg.method``, swap each for a :class:`LowRankLinear` and return what
    the factoring recorded (damping rungs, AIR's objective).

    With several processes each factors its share (balanced by ``k m n``, the cost of the SVD and the sweep) and
    the owner broadcasts the factors, so every process ends with the same layers.
    """
    todo = [n for n in names if ranks[n] is not None]
    world, me = dist.world(), dist.rank()
    owner = dist.assign({n: float(ranks[n] * targets[n].weight.numel()) for n in todo}, world)
    whitening_cache: dict[str, tuple[torch.Tensor, str]] = {}
    done: dict[str, tuple] = {}
    for name in tqdm([n for n in todo if owner[n] == me], desc=f"compress ({cfg.method})", disable=not progress):
        layer = _layer_inputs(name, stats, cfg, device, whitening_cache)
        w = targets[name].weight.detach().to(device, torch.float64)
        uf, vf, extra = METHODS[cfg.method].factor(w, ranks[name], layer, cfg)
        if not (torch.isfinite(uf).all() and torch.isfinite(vf).all()):
            raise WhiteningError(f"factors of {name!r} are not finite; raise eps (e.g. eps=1e-6) or use "
                                 "more calibration samples")
        done[name] = (uf, vf, extra)
    whitening_cache.clear()
    records = Records()
    for name in todo:
        mod = targets[name]
        if world > 1:
            (m, n), k = mod.weight.shape, ranks[name]
            uf, vf, extra = done.get(name) or (torch.empty(m, k, dtype=torch.float64, device=device),
                                               torch.empty(k, n, dtype=torch.float64, device=device), None)
            uf, vf = dist.broadcast(uf, owner[name]), dist.broadcast(vf, owner[name])
            extra = dist.broadcast_object(extra, owner[name])
        else:
            uf, vf, extra = done.pop(name)
        bias = mod.bias.detach() if mod.bias is not None else None
        set_module(model, name, LowRankLinear.from_factors(uf, vf, bias, dtype=mod.weight.dtype,
                                                           device=mod.weight.device))
        # the dense layer is out of the model: drop the last reference to it, so its weight is freed now rather
        # than living beside its factors until the whole model is done
        targets[name] = model.get_submodule(name)
        del mod, uf, vf
        if "rung" in extra:
            records.rungs[name] = extra["rung"]
        if "objective_start" in extra:
            records.objective[name] = [extra["objective_start"], extra["objective_end"]]
    return records


def _layer_inputs(name: str, stats: CalibrationStats | None, cfg: CompressConfig, device: torch.device,
                  whitening_cache: dict) -> dict:
    """The statistics one method call needs for layer ``name`` (whitening shared by the layers of one input)."""
    if stats is None:
        return {}
    out: dict = {"tokens": stats.tokens}
    group = stats.group_of.get(name)
    if group is not None and group in stats.abs_sum:
        out["abs_sum"] = stats.abs_sum[group].to(device)
    if METHODS[cfg.method].whitened:
        if group not in whitening_cache:
            whitening_cache.clear()  # layers of one group are adjacent; keep memory bounded
            whitening_cache[group] = linalg.whitening_factor(stats.grams[group].to(device), cfg.eps,
                                                                cfg.whitening)
        out["whitening"] = whitening_cache[group]
        if cfg.output_weight > 0:
            out["output"] = curvature.output_factor(stats.influence[OGRAD][name].to(device), cfg.output_weight,
                                                    cfg.eps)
    for sig, maps in stats.influence.items():
        if name in maps:
            out[sig] = maps[name].to(device)
    return out

