"""Calibrate and compress a model one group of decoder blocks at a time.

:class:`StreamCompressor` is the block loop: it moves hidden states through the blocks and asks for statistics
at each group, nothing else. The algorithm plugs in as a callback (``factor(names, stats) -> Records``, the
method's factorization of the named layers); the statistics come from forward passes with hooks
(:class:`~air_ft.calibration.StatsHooks`) and one backward per group, or from :class:`BlockCache`, the one object
that keeps the per-block disk cache (the dense model's statistics, shared by every run on the same data) and
this run's finished factors (resume).

For each group of consecutive blocks (as many as ``stats_memory_gb`` holds the statistics of):

1. its Grams over its input hidden states, and its exit hidden states (a forward of its blocks alone);
2. its influence maps (if the method needs them) from one backward of the whole model in which the blocks
   before it stand aside and the group's input hidden states enter its first block (the dense model's, or with
   ``sequential`` those the compressed blocks produce); the backward stops at the group;
3. its blocks are factored one by one, with the Grams of step 1, or with ``sequential`` the Grams of the inputs
   that the compressed blocks before each produce (the hidden states advance through each block once it is
   compressed);
4. its statistics are freed and its exit hidden states are the next group's inputs.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from air_ft import dist, linalg
from air_ft.calibration import CalibrationStats, StatsHooks, calibrate
from air_ft.errors import RecipeError
from air_ft.refine import refine_block
from air_ft.stream import BlockCache, Records, capture_inputs, find_blocks, inject, passthrough, run_block

__all__ = ["Records", "StreamCompressor", "StreamOutcome"]


@dataclass
class StreamOutcome:
    """What a streamed compression did: its records, timings and the ``stream`` report (blocks, groups,
    influence passes, resumed blocks, peak statistics / device / host memory)."""

    records: Records
    calibration_seconds: float
    compression_seconds: float
    calibration_tokens: int
    calibration_cached: bool
    stream: dict


Factor = Callable[[list[str], CalibrationStats], Records]


class StreamCompressor:
    """The block loop of :func:`air_ft.compress` (see the module docstring).

    Args:
        model: the model, compressed in place.
        windows: ``(N, T)`` calibration token ids.
        targets: layer name -> ``nn.Linear`` to compress (entries are replaced by the factored layers as they
            are made, so that the dense weights are freed).
        cfg: the :class:`~air_ft.config.CompressConfig`.
        factor: ``(names, stats) -> Records``: factors the named layers with ``stats`` and swaps them in.
        need_gram: the method reads Grams; influence: the influence signal it reads (None: no backward);
            whitened: the influence is measured on the whitened weight (needs the Grams' roots first);
            kind: the cache name of the influence maps; ranks: the planned ranks (they key the resume files).
        on_block: called as ``on_block(block, names)`` after a block's layers are factored and its factors kept.
        resume: keep each finished block's factors on disk so that a killed run resumes (off for a pass whose
            callback only reads the statistics, such as the spectra of global rank allocation).
        maps: the backward measures the element-wise influence maps; False: the output-gradient Grams alone
            (``ograd``, what global rank allocation reads), a much cheaper backward.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, targets: dict[str, nn.Linear], cfg, factor: Factor,
                 need_gram: bool, need_infl: bool, whitened: bool, kind: str, ranks: dict,
                 on_block: Callable[[int, list[str]], None] | None = None, resume: bool = True, maps: bool = True):
        self.model, self.targets, self.cfg, self.factor, self.on_block = model, targets, cfg, factor, on_block
        self.need_gram, self.need_infl, self.whitened, self.maps = need_gram, need_infl, whitened, maps
        self.blocks = find_blocks(model, targets)
        self.device = next(model.parameters()).device
        batches = list(windows.split(cfg.batch_size))
        if len(batches) < dist.world():
            raise RecipeError(f"{len(batches)} calibration batches for {dist.world()} processes: raise num_samples "
                              "or lower batch_size so that every process gets a batch")
        self.mine = dist.shard(batches) if cfg.data_parallel else batches
        self.tokens, self.n = int(windows.numel()), len(self.blocks)
        # the backward reads the first influence_samples windows: the first whole batches, at least one a process
        few = cfg.influence_samples
        n_infl = len(batches) if not few else min(len(batches), max(-(-few // cfg.batch_size), dist.world()))
        self.infl_batches = len(range(dist.rank(), n_infl, dist.world())) if cfg.data_parallel else n_infl
        self.infl_tokens = sum(int(b.numel()) for b in batches[:n_infl])
        self.cache = BlockCache.open(model, windows, targets, cfg, ranks, kind, self.n, resume)
        self.records = Records()
        self.peak = {"stats": 0, "grams_computed": 0, "influence_passes": 0}
        self.seconds = {"calibration": 0.0, "factoring": 0.0, "refine": 0.0}
        self.inputs = None
        self.dense_trace = None  # with refinement: the dense model's hidden states, one block ahead of the factoring
        self.refined: dict[int, dict] = {}
        self.exit_states: list[torch.Tensor] | None = None  # the last refined block's outputs (its next inputs)

    def members(self, i: int) -> list[str]:
        return self.blocks.members(i, self.targets)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the processes of a statistic accumulated on this process's batches (``data_parallel``)."""
        return dist.all_reduce_sum(t) if self.cfg.data_parallel else t

    def _grams(self, i: int, inputs, update: bool) -> CalibrationStats:
        """Block ``i``'s Grams over ``inputs`` (summed over the processes), advancing them when ``update``."""
        hooks = StatsHooks({n: self.targets[n] for n in self.members(i)}, influence=False)
        hooks.attach()
        try:
            run_block(self.blocks, i, inputs, update=update, hooks=hooks)
        finally:
            hooks.detach()
        return CalibrationStats({k: self._reduce(v) for k, v in hooks.grams.items()},
                                {k: self._reduce(v) for k, v in hooks.abs_sum.items()}, dict(hooks.group_of),
                                self.tokens)

    def _factor(self, i: int, stats: CalibrationStats) -> None:
        records = self.factor(self.members(i), stats)
        if self.dense_trace is not None:  # tune the block's factors to the dense exit (air_ft.refine)
            rec = refine_block(self.blocks.modules[i], self.inputs.hidden, self.inputs.extra[i],
                               self.dense_trace.hidden, self.cfg.refine_steps, self.cfg.refine_lr,
                               sharded=self.cfg.data_parallel, loss=self.cfg.refine_loss,
                               lr_scale=self.cfg.refine_lr_scale)
            self.refined[i] = rec.to_json()
            self.seconds["refine"] += rec.seconds
            self.exit_states = rec.outputs
        self.records.add(records)
        self.cache.save_factors(i, self.model, self.members(i), records)
        if self.on_block is not None:
            self.on_block(i, self.members(i))

    # ----------------------------------------------------------------------------------------------- the loop

    def run(self) -> StreamOutcome:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        # every statistic on disk already (the dense model's): no forward at all, each block is read and factored
        lazy = self.cache.enabled and not self.cfg.sequential and all(
            (not self.need_gram or self.cache.has_grams(i)) and (not self.need_infl or self.cache.has_maps(i))
            for i in range(self.n) if self.members(i))
        self.inputs = None if lazy else capture_inputs(self.model, self.blocks, self.mine, self.device)
        if self.cfg.refine_steps > 0:
            self.dense_trace = self.inputs.fork()
        first = self._resume(lazy)
        self.seconds["calibration"] += time.perf_counter() - t0
        groups = self._groups(range(first, self.n))
        bar = tqdm(total=self.n - first, desc=f"compress ({self.cfg.method}) by block", disable=not self.cfg.progress)
        for ids in groups:
            if lazy:
                self._factor_stored(ids)
            else:
                self._group(ids)
            bar.update(len(ids))
        bar.close()
        dist.barrier()
        self.cache.close()
        return self._outcome(len(groups), first)

    def _resume(self, lazy: bool) -> int:
        """Swap in the factors a killed run left, from block 0 on; the first block still to do."""
        first = 0
        while first < self.n and (not self.members(first) or self.cache.finished(first)):
            first += 1
        first = dist.broadcast_object(first, 0)
        if first and not self.cfg.sequential and not lazy:  # the dense inputs of the first unfinished block
            for i in range(first):
                run_block(self.blocks, i, self.inputs, update=True)
        if first and self.dense_trace is not None:  # the dense states there, while those blocks are still dense
            for i in range(first):
                run_block(self.blocks, i, self.dense_trace, update=True)
        for i in range(first):
            if self.members(i):
                self.records.add(self.cache.restore(i, self.model, self.targets))
            if self.cfg.sequential:
                run_block(self.blocks, i, self.inputs, update=True)
        return first

    def _factor_stored(self, ids: list[int]) -> None:
        t0 = time.perf_counter()
        for i in (i for i in ids if self.members(i)):
            st = self.cache.grams(i, self.tokens) if self.need_gram else CalibrationStats({}, {}, {}, self.tokens)
            st.influence = self.cache.maps(i) if self.need_infl else {}
            self._factor(i, st)
        self.seconds["factoring"] += time.perf_counter() - t0

    def _group(self, ids: list[int]) -> None:
        t0 = time.perf_counter()
        members = {i: self.members(i) for i in ids}
        # a group's statistics are the dense model's (and shared by every run on the same data) unless a block
        # before it is compressed and `sequential` feeds it what the compressed blocks produce
        dense = not self.cfg.sequential or not any(self.members(j) for j in range(ids[0]))
        cache = self.cache if dense and self.cache.enabled else None
        grams, exit_inputs = self._group_grams(ids, members, cache)
        maps = self._group_influence(ids, members, grams, cache) if self.need_infl else {}
        held = [t for st in grams.values() for t in (*st.grams.values(), *st.abs_sum.values())]
        held += [t for per in maps.values() for sig in per.values() for t in sig.values()]
        roots = _nbytes(t for st in grams.values() for t in st.grams.values())
        self.peak["stats"] = max(self.peak["stats"], _nbytes(held) + roots)
        del held
        self.seconds["calibration"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in ids:  # 3. factor the group's blocks
            if self.dense_trace is not None:  # block i is still dense: its exit on the dense states is the target
                run_block(self.blocks, i, self.dense_trace, update=True)
            if members[i]:
                st = grams.get(i) or CalibrationStats({}, {}, {}, self.tokens)
                compressed_before = any(self.members(j) for j in range(i))
                if self.cfg.sequential and self.need_gram and (compressed_before or i not in grams):
                    st = self._grams(i, self.inputs, update=False)  # the inputs the compressed blocks produce
                st.influence = maps.get(i, {})
                self._factor(i, st)
            if self.cfg.sequential and i < self.n - 1:  # the compressed block makes the next inputs
                if self.exit_states is not None:  # refinement measured them with the factors the block keeps
                    self.inputs.hidden[:] = self.exit_states
                else:
                    run_block(self.blocks, i, self.inputs, update=True)
            self.exit_states = None
        if not self.cfg.sequential:
            self.inputs = exit_inputs  # 4. the dense exit is the next group's input
        elif exit_inputs is not None:
            exit_inputs.hidden.clear()
        self.seconds["factoring"] += time.perf_counter() - t0

    def _group_grams(self, ids, members, cache: BlockCache | None) -> tuple[dict[int, CalibrationStats], object]:
        """Step 1: the group's Grams (for its factors, or with ``sequential`` only for the whitened influence) and
        its exit hidden states (None with ``sequential``: the compressed blocks make them, step 3)."""
        all_on_disk = cache is not None and all(cache.has_grams(i) for i in ids if members[i])
        exit_inputs = self.inputs.fork() if not self.cfg.sequential or (self.whitened and not all_on_disk) else None
        grams: dict[int, CalibrationStats] = {}
        if exit_inputs is None:
            if self.whitened:
                grams = {i: cache.grams(i, self.tokens) for i in ids if members[i]}
            return grams, None
        for i in ids:
            on_disk = cache is not None and members[i] and cache.has_grams(i)
            if members[i] and (self.need_gram or self.whitened) and not on_disk:
                grams[i] = self._grams(i, exit_inputs, update=True)
                self.peak["grams_computed"] += 1
                if cache is not None:
                    cache.save_grams(i, grams[i])
            else:
                run_block(self.blocks, i, exit_inputs, update=True)
                if on_disk:
                    grams[i] = cache.grams(i, self.tokens)
        return grams, exit_inputs

    def _group_influence(self, ids, members, grams, cache: BlockCache | None) -> dict[int, dict]:
        """Step 2: the group's influence maps, ``{block: {signal: {layer: map}}}``, stored or from one
        whole-model backward that starts at the group's first block (blocks before it stand aside, the group's
        input hidden states enter it)."""
        todo = [i for i in ids if members[i]]
        if cache is not None and all(cache.has_maps(i) for i in todo):
            return {i: cache.maps(i) for i in todo}
        if not todo:
            return {}
        whitening = None
        if self.whitened:  # S of each input from the group's dense Grams
            whitening = {}
            for i in todo:
                roots = {g: linalg.whitening_factor(grams[i].grams[g], self.cfg.eps, self.cfg.whitening)[0]
                         for g in set(grams[i].group_of.values())}
                whitening.update({n: roots[g] for n, g in grams[i].group_of.items()})
        group = {n: self.targets[n] for i in todo for n in members[i]}
        start = todo[0]
        label = f"influence, block {start}" + (f"-{todo[-1]}" if len(todo) > 1 else "")
        module = self.blocks.modules[start]
        nb = self.infl_batches
        with passthrough(self.blocks, start, self.inputs.returns_tuple), inject(module, self.inputs.hidden[:nb]):
            st = calibrate(self.model, torch.cat(self.mine[:nb]), group, influence=True,
                           batch_size=self.cfg.batch_size, progress=self.cfg.progress, whitening=whitening,
                           grams=False, start=module, checkpointing=self.cfg.checkpointing, desc=label,
                           tokens=self.infl_tokens, maps=self.maps)
        self.peak["influence_passes"] += 1
        out = {}
        for i in todo:
            out[i] = {sig: {n: self._reduce(maps[n]) for n in members[i]} for sig, maps in st.influence.items()}
            if cache is not None:
                cache.save_maps(i, out[i])
        return out

    def _groups(self, todo) -> list[list[int]]:
        """Consecutive runs of blocks whose statistics (Grams, their roots, influence maps; bounded above by their
        shapes) fit ``stats_memory_gb``; one block per group when nothing needs a backward."""
        todo = list(todo)
        if not self.need_infl:
            return [[i] for i in todo]

        def bytes_of(i: int) -> int:
            names = self.members(i)
            maps = sum(self.targets[n].weight.numel() * 4 * (1 if self.whitened else 2)
                       + self.targets[n].out_features ** 2 * 8 for n in names)  # + the output-gradient Gram
            grams = sum(self.targets[n].in_features ** 2 * 8 for n in names)  # an upper bound: inputs are shared
            return maps + 2 * grams + (grams // 2 if self.whitened else 0)

        budget = self.cfg.stats_memory_gb * 2 ** 30
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

    def _outcome(self, groups: int, resumed: int) -> StreamOutcome:
        stream = {"blocks": self.n, "groups": groups, "influence_passes": self.peak["influence_passes"],
                  "influence_tokens": self.infl_tokens if self.need_infl else 0,
                  "sequential": self.cfg.sequential, "processes": dist.world(), "resumed_blocks": resumed,
                  "peak_stats_bytes": self.peak["stats"],
                  "hidden_state_bytes": self.inputs.nbytes() if self.inputs is not None else 0,
                  "peak_device_bytes": (torch.cuda.max_memory_allocated(self.device)
                                        if self.device.type == "cuda" else None),
                  "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "stats_dir": str(self.cache.stats.root) if self.cache.enabled else None,
                  "influence_of": ("the inputs the compressed blocks before each group produce"
                                   if self.cfg.sequential else "the dense model") if self.need_infl else None}
        if self.dense_trace is not None:  # calibration cost: it reads the calibration data, it is not factoring
            stream["refine"] = {"steps_per_block": self.cfg.refine_steps, "lr": self.cfg.refine_lr,
                                "lr_scale": self.cfg.refine_lr_scale,
                                "loss": self.cfg.refine_loss,
                                "windows_per_step": self.cfg.batch_size, "seconds": self.seconds["refine"],
                                "tokens": sum(r["tokens"] for r in self.refined.values()), "blocks": self.refined}
        refine = self.seconds["refine"]
        return StreamOutcome(self.records, self.seconds["calibration"] + refine, self.seconds["factoring"] - refine,
                             self.tokens,
                             self.peak["grams_computed"] == 0 and self.peak["influence_passes"] == 0, stream)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

