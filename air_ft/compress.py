"""The compression stage: calibrate, then factor every target layer with one of five methods.

Reads top to bottom: validate -> choose layers and ranks -> calibration statistics, streamed one decoder block at
a time (cached per block) -> per block and layer: factor (pure math in :mod:`air_ft.linalg`) and swap in a
:class:`~air_ft.modeling.LowRankLinear`. Memory holds one block's statistics, whatever the depth.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from air_ft import dist, linalg
from air_ft.assets import cache_root
from air_ft.calibration import (
    WHITENED,
    CalibrationStats,
    StatsHooks,
    calibrate,
    load_stats,
    model_fingerprint,
    save_stats,
    stats_key,
)
from air_ft.checkpoint import record_factoring
from air_ft.config import CompressConfig, build_dataclass
from air_ft.data import sample_windows
from air_ft.errors import RecipeError, WhiteningError
from air_ft.methods import METHODS
from air_ft.modeling import LowRankLinear, count_parameters, find_targets, prepare_model, set_module
from air_ft.stream import BlockStore, capture_inputs, find_blocks, inject, passthrough, run_block

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
             windows: torch.Tensor | None = None, **options) -> CompressResult:
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
        method: ``svd`` | ``asvd`` | ``fwsvd`` | ``svdllm`` | ``air``.
        retention: fraction of the compressed layers' parameters kept.
        stats: precomputed :class:`CalibrationStats` of every layer at once (the all-at-once reference path:
            skips calibration; benchmarks share one).
        windows: ``(N, T)`` calibration token ids to use as they are, instead of drawing ``num_samples`` windows
            of ``seq_len`` tokens from ``texts``.
        **options: any other :class:`~air_ft.config.CompressConfig` field (delta, influence, normalization,
            sweeps, tol, include, exclude, als_dtype, als_backend, eps, batch_size, sequential, stats_memory_gb,
            checkpointing, cache, progress, device).

    Returns:
        A :class:`CompressResult`: ranks, rungs, per-layer ``objective`` (AIR), parameter counts, timings and,
        for the streamed path, ``stream`` (blocks, influence passes, peak statistics / device / host memory).
    """
    device = options.pop("device", None)
    prepare_model(model)
    dist.init_from_env()
    if method in METHODS and METHODS[method].trains:
        raise RecipeError(f"method {method!r} trains masks and LoRA: use air_ft.acip_fit(model, tok, texts, ...)"
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
    entry = METHODS[cfg.method]
    need_gram, need_infl = entry.needs_gram, entry.influence(cfg) is not None
    if windows is not None and (windows.dim() != 2 or windows.dtype not in (torch.long, torch.int) or
                                windows.shape[1] < 2 or windows.shape[0] < 1):
        raise RecipeError(f"windows must be an (N, T) tensor of token ids with N >= 1 and T >= 2, got "
                          f"{tuple(windows.shape)} {windows.dtype}")
    if (need_gram or need_infl) and stats is None and not texts and windows is None:
        raise RecipeError(f"method {cfg.method!r} needs calibration texts (a non-empty list of strings)")
    if stats is not None and need_infl and entry.influence(cfg) not in stats.influence:
        raise RecipeError(f"calibration statistics hold no {entry.influence(cfg)!r} influence; recalibrate")
    params_before = count_parameters(model)
    # counted now: a layer's dense weight is released as soon as its factors replace it
    linear_before = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in targets.values())
    linear_after = sum((m.weight.numel() if ranks[n] is None else ranks[n] * sum(m.weight.shape))
                       + (m.bias.numel() if m.bias is not None else 0) for n, m in targets.items())
    math_device = torch.device(device) if device else next(model.parameters()).device
    info: dict = {"method": cfg.method, "retention": cfg.retention, "ranks": dict(ranks), "rungs": {},
                  "objective": {}, "config": {k: v for k, v in vars(cfg).items()}}
    t0 = time.perf_counter()
    if stats is not None or not (need_gram or need_infl):
        _factor_layers(model, targets, list(targets), ranks, stats, cfg, math_device, info, progress=cfg.progress)
        info.update(compression_seconds=time.perf_counter() - t0,
                    calibration_seconds=stats.seconds if stats is not None else 0.0,
                    calibration_cached=bool(stats.cached) if stats is not None else False,
                    calibration_tokens=stats.tokens if stats is not None else 0)
    else:
        if windows is None:
            windows = sample_windows(tok, texts, cfg.num_samples, cfg.seq_len, cfg.seed)
        info.update(_stream(model, windows, targets, ranks, cfg, math_device, info, need_gram, need_infl))
    record_factoring(model, cfg.method, cfg.retention)
    return CompressResult(
        method=cfg.method, retention=cfg.retention, ranks=info["ranks"], retention_actual=linear_after / linear_before,
        linear_params_before=linear_before, linear_params_after=linear_after, model_params_before=params_before,
        model_params_after=count_parameters(model), rungs=info["rungs"], objective=info["objective"],
        config=info["config"], calibration_seconds=info["calibration_seconds"],
        compression_seconds=info["compression_seconds"], calibration_tokens=info["calibration_tokens"],
        calibration_cached=info["calibration_cached"], stream=info.get("stream"))


def _factor_layers(model: nn.Module, targets: dict[str, nn.Linear], names: list[str], ranks: dict,
                   stats: CalibrationStats | None, cfg: CompressConfig, device: torch.device, info: dict,
                   progress: bool = False) -> None:
    """Factor the layers ``names`` with ``cfg.method`` and swap each for a :class:`LowRankLinear`.

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
            info["rungs"][name] = extra["rung"]
        if "objective_start" in extra:
            info["objective"][name] = [extra["objective_start"], extra["objective_end"]]


def _reduce(cfg: CompressConfig, t: torch.Tensor) -> torch.Tensor:
    """The sum over the processes of a statistic accumulated on this process's batches (``data_parallel``)."""
    return dist.all_reduce_sum(t) if cfg.data_parallel else t


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stream(model: nn.Module, windows: torch.Tensor, targets: dict[str, nn.Linear], ranks: dict,
            cfg: CompressConfig, device: torch.device, info: dict, need_gram: bool, need_infl: bool) -> dict:
    """Calibrate and compress one group of consecutive decoder blocks at a time; return timings and memory.

    The inputs of block 0 are captured once. For each group (as many blocks as ``stats_memory_gb`` holds the
    statistics of):

    1. its blocks run, dense, over the group's input hidden states with hooks: their Grams, and the hidden states
       at the group's exit;
    2. the influence maps of its layers from a whole-model backward that starts at the group: the blocks before
       it stand aside and the group's input hidden states enter its first block (the dense model's, so the maps
       are the dense model's whatever was compressed before; with ``sequential``, those the compressed blocks
       produce); the backward stops at the group;
    3. its blocks are factored one by one, their Grams the dense ones of step 1, or with ``sequential`` the Grams
       of the inputs that the compressed blocks before each produce (the hidden states advance through each block
       once it is compressed);
    4. the group's statistics are freed and its exit hidden states are the next group's inputs.

    With ``cache``, every block's dense Grams and maps are stored on disk and reused by later runs on the same
    data (with ``sequential``, the first group's only: the later groups' depend on the compression), and the
    factors of every finished block are kept until the run completes, so a killed run resumes from its last
    finished block.
    """
    blocks = find_blocks(model, targets)
    run_device = next(model.parameters()).device
    whitened = need_infl and METHODS[cfg.method].influence(cfg) == WHITENED
    kind = f"influence-{WHITENED}-{cfg.whitening}-{cfg.eps}" if whitened else "influence-wxg+fisher"
    batches = list(windows.split(cfg.batch_size))
    if len(batches) < dist.world():
        raise RecipeError(f"{len(batches)} calibration batches for {dist.world()} processes: raise num_samples or "
                          "lower batch_size so that every process gets a batch")
    mine = dist.shard(batches) if cfg.data_parallel else batches
    tokens, n_blocks = int(windows.numel()), len(blocks)
    if run_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run_device)
    store = _open_store(model, windows, targets, cfg) if cfg.cache else None
    run = BlockStore(_run_dir(store.root, cfg, ranks), writer=dist.is_main()) if store is not None else None
    peak = {"stats": 0, "grams_computed": 0, "influence_passes": 0}
    seconds = {"calibration": 0.0, "factoring": 0.0}
    # what the cache holds, as the main process sees it before anything is written (every process must take the
    # same branches: a block one process reads back while another computes it would leave a collective waiting)
    stored = dist.broadcast_object({
        "grams": [i for i in range(n_blocks) if store is not None and store.has("grams", i)],
        "maps": [i for i in range(n_blocks) if store is not None and store.has(kind, i)]}, 0)
    stored = {k: set(v) for k, v in stored.items()}
    # every statistic on disk already: no forward at all, each block is read back and factored
    lazy = store is not None and not cfg.sequential and all(
        (not need_gram or i in stored["grams"]) and (not need_infl or i in stored["maps"])
        for i in range(n_blocks) if blocks.members(i, targets))
    t0 = time.perf_counter()
    inputs = None if lazy else capture_inputs(model, blocks, mine, run_device)
    # resume: the blocks whose factors a killed run left, from block 0 on
    first = 0
    while first < n_blocks and (not blocks.members(first, targets) or (run is not None and run.has("factors", first))):
        first += 1
    first = dist.broadcast_object(first, 0)
    if first:
        if not cfg.sequential and not lazy:  # the dense inputs of the first unfinished block, then its factors
            for i in range(first):
                run_block(blocks, i, inputs, update=True)
        for i in range(first):
            if blocks.members(i, targets):
                _restore(run, i, model, targets, info)
            if cfg.sequential:
                run_block(blocks, i, inputs, update=True)
    seconds["calibration"] += time.perf_counter() - t0
    groups = _groups(blocks, targets, range(first, n_blocks), cfg, whitened, need_infl)
    bar = tqdm(total=n_blocks - first, desc=f"compress ({cfg.method}) by block", disable=not cfg.progress)
    for ids in groups:
        t0 = time.perf_counter()
        members = {i: blocks.members(i, targets) for i in ids}
        # a group's statistics are the dense model's (and shared by every run on the same data) unless a block
        # before it is compressed and `sequential` feeds it what the compressed blocks produce
        dense = not cfg.sequential or not any(blocks.members(j, targets) for j in range(ids[0]))
        group_store = store if dense else None
        if lazy:
            for i in (i for i in ids if members[i]):
                st = (_stats_from(*store.load("grams", i, run_device), tokens) if need_gram
                      else CalibrationStats({}, {}, {}, tokens))
                st.influence = _maps_from(store.load(kind, i, run_device)[0]) if need_infl else {}
                _factor_layers(model, targets, members[i], ranks, st, cfg, device, info)
                if run is not None:
                    _save_factors(run, i, model, members[i], info)
            bar.update(len(ids))
            seconds["factoring"] += time.perf_counter() - t0
            continue
        # 1. the group's Grams over its input hidden states (for its factors, or with `sequential` only for the
        #    whitened influence), and its exit hidden states
        all_on_disk = group_store is not None and all(i in stored["grams"] for i in ids if members[i])
        # with `sequential` the exit is made by the compressed blocks (step 3): a forward here only for Grams
        exit_inputs = inputs.fork() if not cfg.sequential or (whitened and not all_on_disk) else None
        grams: dict[int, CalibrationStats] = {}
        if exit_inputs is None and whitened:
            grams = {i: _stats_from(*group_store.load("grams", i, run_device), tokens) for i in ids if members[i]}
        for i in ids if exit_inputs is not None else []:
            on_disk = group_store is not None and members[i] and i in stored["grams"]
            hooks = StatsHooks({n: targets[n] for n in members[i]}, influence=False) if (
                members[i] and (need_gram or whitened) and not on_disk) else None
            _run_with(hooks, blocks, i, exit_inputs)
            if on_disk:
                grams[i] = _stats_from(*group_store.load("grams", i, run_device), tokens)
            elif hooks is not None:
                grams[i] = CalibrationStats({k: _reduce(cfg, v) for k, v in hooks.grams.items()},
                                            {k: _reduce(cfg, v) for k, v in hooks.abs_sum.items()},
                                            dict(hooks.group_of), tokens)
                peak["grams_computed"] += 1
                if group_store is not None:
                    group_store.save("grams", i, {**{f"gram::{k}": v for k, v in grams[i].grams.items()},
                                                  **{f"abs::{k}": v for k, v in grams[i].abs_sum.items()}},
                                     {"group_of": grams[i].group_of, "tokens": tokens})
        maps = _group_influence(model, blocks, ids, members, targets, inputs, torch.cat(mine), grams, group_store,
                                stored["maps"], kind, whitened, tokens, cfg, peak) if need_infl else {}
        held = [t for st in grams.values() for t in (*st.grams.values(), *st.abs_sum.values())]
        held += [t for per in maps.values() for sig in per.values() for t in sig.values()]
        peak["stats"] = max(peak["stats"], _nbytes(held) + _nbytes(t for st in grams.values()
                                                                   for t in st.grams.values()))  # + their roots
        del held
        seconds["calibration"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in ids:  # 3. factor the group's blocks
            if members[i]:
                st = grams.get(i) or CalibrationStats({}, {}, {}, tokens)
                if cfg.sequential and need_gram:  # the Grams of the inputs the compressed blocks before produce
                    hooks = StatsHooks({n: targets[n] for n in members[i]}, influence=False)
                    _run_with(hooks, blocks, i, inputs, update=False)
                    st = CalibrationStats({k: _reduce(cfg, v) for k, v in hooks.grams.items()},
                                          {k: _reduce(cfg, v) for k, v in hooks.abs_sum.items()},
                                          dict(hooks.group_of), tokens)
                st.influence = maps.get(i, {})
                _factor_layers(model, targets, members[i], ranks, st, cfg, device, info)
                if run is not None:
                    _save_factors(run, i, model, members[i], info)
            if cfg.sequential and i < n_blocks - 1:
                run_block(blocks, i, inputs, update=True)  # the compressed block makes the next block's inputs
            bar.update(1)
        if not cfg.sequential:
            inputs = exit_inputs  # 4. the dense exit is the next group's input
        elif exit_inputs is not None:
            exit_inputs.hidden.clear()
        del grams, maps, exit_inputs
        seconds["factoring"] += time.perf_counter() - t0
    bar.close()
    dist.barrier()
    if run is not None and run.writer:
        shutil.rmtree(run.root, ignore_errors=True)
    return _stream_report(seconds, tokens, peak, n_blocks, len(groups), first, cfg, store, run_device, need_infl,
                          inputs.nbytes() if inputs is not None else 0)


def _stream_report(seconds, tokens, peak, n_blocks, groups, resumed, cfg, store, device, need_infl,
                   hidden_bytes=0) -> dict:
    import resource

    return {"calibration_seconds": seconds["calibration"], "compression_seconds": seconds["factoring"],
            "calibration_tokens": tokens,
            "calibration_cached": peak["grams_computed"] == 0 and peak["influence_passes"] == 0,
            "stream": {"blocks": n_blocks, "groups": groups, "influence_passes": peak["influence_passes"],
                       "sequential": cfg.sequential, "processes": dist.world(), "resumed_blocks": resumed,
                       "peak_stats_bytes": peak["stats"], "hidden_state_bytes": hidden_bytes,
                       "peak_device_bytes": (torch.cuda.max_memory_allocated(device)
                                             if device.type == "cuda" else None),
                       "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       "stats_dir": str(store.root) if store is not None else None,
                       "influence_of": ("the inputs the compressed blocks before each group produce"
                                        if cfg.sequential else "the dense model") if need_infl else None}}


def _maps_from(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        sig, name = key.split("::", 1)
        out.setdefault(sig, {})[name] = val
    return out


def _run_with(hooks, blocks, i: int, inputs, update: bool = True) -> None:
    """Run block ``i`` over ``inputs`` with ``hooks`` attached (if any)."""
    if hooks is not None:
        hooks.attach()
    try:
        run_block(blocks, i, inputs, update=update, hooks=hooks)
    finally:
        if hooks is not None:
            hooks.detach()


def _stats_from(tensors: dict, meta: dict, tokens: int) -> CalibrationStats:
    grams = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("gram::")}
    abs_sum = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("abs::")}
    return CalibrationStats(grams, abs_sum, meta["group_of"], tokens)


def _groups(blocks, targets, todo, cfg: CompressConfig, whitened: bool, need_infl: bool) -> list[list[int]]:
    """Consecutive runs of blocks whose statistics (Grams, their roots, influence maps; bounded above by their
    shapes) fit ``stats_memory_gb``; one block per group when nothing needs a backward."""
    todo = list(todo)
    if not need_infl:
        return [[i] for i in todo]

    def bytes_of(i: int) -> int:
        names = blocks.members(i, targets)
        maps = sum(targets[n].weight.numel() * 4 * (1 if whitened else 2) for n in names)
        grams = sum(targets[n].in_features ** 2 * 8 for n in names)  # an upper bound: inputs are shared
        return maps + 2 * grams + (grams // 2 if whitened else 0)

    budget = cfg.stats_memory_gb * 2 ** 30
    groups: list[list[int]] = []
    used = 0
    for i in todo:
        b = bytes_of(i)
        if groups and used + b <= budget:
            groups[-1].append(i)
            used += b
        else:
            groups.append([i])
            used = b
    return groups


def _group_influence(model, blocks, ids, members, targets, inputs, windows, grams, store, on_disk, kind,
                     whitened, tokens, cfg, peak) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Step 2 of :func:`_stream`: the group's influence maps, ``{block: {signal: {layer: map}}}``, stored or from
    one whole-model backward that starts at the group's first block (blocks before it stand aside, the group's
    stored dense inputs enter it). ``windows``: this process's calibration tokens (the labels), in batch order;
    ``on_disk``: the blocks whose maps the cache held when the run started."""
    device = next(model.parameters()).device
    out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    todo = [i for i in ids if members[i]]
    if store is not None and all(i in on_disk for i in todo):
        return {i: _maps_from(store.load(kind, i, device)[0]) for i in todo}
    if not todo:
        return out
    whitening = None
    if whitened:  # S of each input from the group's dense Grams
        whitening = {}
        for i in todo:
            roots = {g: linalg.whitening_factor(grams[i].grams[g], cfg.eps, cfg.whitening)[0]
                     for g in set(grams[i].group_of.values())}
            whitening.update({n: roots[g] for n, g in grams[i].group_of.items()})
    group = {n: targets[n] for i in todo for n in members[i]}
    start = todo[0]
    label = f"influence, block {start}" + (f"-{todo[-1]}" if len(todo) > 1 else "")
    with passthrough(blocks, start, inputs.returns_tuple), inject(blocks.modules[start], inputs.hidden):
        st = calibrate(model, windows, group, influence=True,
                       batch_size=cfg.batch_size, progress=cfg.progress, whitening=whitening, grams=False,
                       start=blocks.modules[start], checkpointing=cfg.checkpointing, desc=label, tokens=tokens)
    peak["influence_passes"] += 1
    for i in todo:
        per = {sig: {n: _reduce(cfg, maps[n]) for n in members[i]} for sig, maps in st.influence.items()}
        out[i] = per
        if store is not None:
            store.save(kind, i, {f"{sig}::{n}": t for sig, m in per.items() for n, t in m.items()},
                       {"signals": sorted(per)})
    return out


def _open_store(model: nn.Module, windows: torch.Tensor, targets: dict, cfg: CompressConfig) -> BlockStore:
    """The per-block statistics cache, shared by the processes and written by the main one."""
    key = dist.broadcast_object(stats_key(model_fingerprint(model), windows, list(targets), "blocks"), 0)
    return BlockStore(stats_dir() / f"blocks-{key}", writer=dist.is_main())


def _run_dir(stats_root: Path, cfg: CompressConfig, ranks: dict) -> Path:
    settings = {k: v for k, v in vars(cfg).items() if k not in ("progress", "cache", "device")}
    key = hashlib.sha256(json.dumps([stats_root.name, settings, ranks], sort_keys=True, default=str).encode())
    return cache_root() / "runs" / key.hexdigest()[:24]


def _save_factors(run: BlockStore, i: int, model: nn.Module, names: list[str], info: dict) -> None:
    """Block ``i``'s factors (as the model stores them) and its per-layer records, for a resumed run."""
    tensors = {}
    for n in names:
        mod = model.get_submodule(n)
        if isinstance(mod, LowRankLinear):
            tensors[f"u::{n}"], tensors[f"v::{n}"] = mod.factor_u.weight, mod.factor_v.weight
    run.save("factors", i, tensors, {"rungs": {n: info["rungs"][n] for n in names if n in info["rungs"]},
                                     "objective": {n: info["objective"][n] for n in names if n in info["objective"]}})


def _restore(run: BlockStore, i: int, model: nn.Module, targets: dict[str, nn.Linear], info: dict) -> None:
    tensors, meta = run.load("factors", i)
    for key in [k for k in tensors if k.startswith("u::")]:
        name = key[3:]
        mod = targets[name]
        bias = mod.bias.detach() if mod.bias is not None else None
        set_module(model, name, LowRankLinear.from_factors(tensors[key], tensors[f"v::{name}"], bias,
                                                           dtype=mod.weight.dtype, device=mod.weight.device))
        targets[name] = model.get_submodule(name)  # the dense layer is freed (see _factor_layers)
    info["rungs"].update(meta["rungs"])
    info["objective"].update(meta["objective"])


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
    for sig, maps in stats.influence.items():
        if name in maps:
            out[sig] = maps[name].to(device)
    return out


def stats_dir() -> Path:
    """Where calibration statistics are cached."""
    return cache_root() / "stats"
