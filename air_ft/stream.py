"""Decoder-block streaming: the machinery that keeps compression memory bounded by one block.

The hidden states entering decoder block 0 are captured once for every calibration batch (the model's forward
with its blocks passed through), together with the keyword arguments each block receives (position embeddings,
masks; captured per block, since models with sliding-window layers pass different masks to different blocks). A
block is then run on its own over those hidden states, with hooks that accumulate its statistics, and its outputs
become the next block's inputs. Statistics of finished blocks live on disk (:class:`BlockStore`; the per-block cache
of a compression and its resume files are one :class:`BlockCache`), never all in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from air_ft import dist
from air_ft.assets import cache_root
from air_ft.calibration import CalibrationStats, model_fingerprint, stats_dir, stats_key
from air_ft.config import result_fields
from air_ft.errors import RecipeError
from air_ft.files import atomic_file, write_text
from air_ft.modeling import LowRankLinear, set_module

__all__ = ["Blocks", "find_blocks", "BlockInputs", "capture_inputs", "run_block", "BlockStore", "BlockCache",
           "Records", "passthrough", "inject"]


@dataclass
class Blocks:
    """The decoder blocks of a model and which block each target layer lives in."""

    modules: nn.ModuleList
    prefix: str  # module name of the list, e.g. "model.layers"
    of: dict[str, int]  # target name -> block index

    def __len__(self) -> int:
        return len(self.modules)

    def members(self, i: int, names) -> list[str]:
        """The names among ``names`` that live in block ``i``, in model order."""
        return [n for n in names if self.of[n] == i]


def find_blocks(model: nn.Module, targets) -> Blocks:
    """The ``nn.ModuleList`` that holds the target layers (``model.layers`` for LLaMA-like models,
    ``transformer.h``, ``gpt_neox.layers``...): the list that contains the most targets.

    Raises:
        RecipeError: if some target layers lie outside every block (they could not be streamed).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    names = list(targets)
    for list_name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        prefix = f"{list_name}." if list_name else ""
        count = sum(n.startswith(prefix) for n in names)
        if count and (best is None or count > best[0]):
            best = (count, list_name, mod)
    if best is None:
        raise RecipeError("the model has no list of decoder blocks (nn.ModuleList) holding the target layers; "
                          "block-streaming compression needs one (every Hugging Face decoder has model.layers or "
                          "similar)")
    _, list_name, modules = best
    prefix = f"{list_name}." if list_name else ""
    of, outside = {}, []
    for n in names:
        head, _, _ = n[len(prefix):].partition(".") if n.startswith(prefix) else ("", "", "")
        if head.isdigit():
            of[n] = int(head)
        else:
            outside.append(n)
    if outside:
        raise RecipeError(f"layers {outside[:3]} lie outside the decoder blocks {list_name!r}; exclude them "
                          "(compress.exclude) to stream the compression block by block")
    return Blocks(modules, list_name, of)


class _Stop(Exception):
    """Raised once the last block's inputs are captured: nothing after the blocks is needed."""


def _dedup(value, previous):
    """``previous`` when ``value`` holds the same tensors (so equal masks and position embeddings of the batches are
    stored once), else ``value``."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        same = value.shape == previous.shape and value.dtype == previous.dtype and torch.equal(value, previous)
        return previous if same else value
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        out = tuple(_dedup(v, p) for v, p in zip(value, previous))
        return previous if all(o is p for o, p in zip(out, previous)) else out
    return value


@dataclass
class BlockInputs:
    """What enters each block for this process's calibration batches.

    ``hidden[b]`` is batch ``b``'s hidden state at the entry of the block being processed (overwritten in place as
    the stream advances); ``extra[i][b]`` the other positional and keyword arguments block ``i`` receives.
    """

    hidden: list[torch.Tensor]
    extra: list[list[tuple[tuple, dict]]] = field(default_factory=list)
    returns_tuple: bool = False  # what the model's blocks return (for pass-through stand-ins)

    def fork(self) -> BlockInputs:
        """A copy that advances on its own (the tensors are shared until a block replaces them)."""
        return BlockInputs(hidden=list(self.hidden), extra=self.extra, returns_tuple=self.returns_tuple)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def passthrough(blocks: Blocks, upto: int, returns_tuple: bool, record=None):
    """Within this block, blocks ``0 .. upto-1`` hand their hidden state on unchanged (as a 1-tuple when the
    model's blocks return tuples) instead of computing; ``record(i, args, kwargs)`` sees each call first."""
    saved = [blk.__dict__.get("forward") for blk in blocks.modules[:upto]]

    def stand_in(i):
        def forward(*args, **kwargs):
            if record is not None:
                record(i, args, kwargs)
            h = _hidden_of(args, kwargs)
            return (h,) if returns_tuple else h
        return forward

    for i, blk in enumerate(blocks.modules[:upto]):
        blk.forward = stand_in(i)
    try:
        yield
    finally:
        for blk, fwd in zip(blocks.modules[:upto], saved):
            if fwd is None:
                del blk.forward
            else:
                blk.forward = fwd


@contextlib.contextmanager
def inject(block: nn.Module, hidden: list[torch.Tensor]):
    """Within this block, the ``b``-th call of ``block`` gets ``hidden[b]`` as its hidden state, whatever reaches it
    (with :func:`passthrough` below it: a forward that starts at this block from stored inputs)."""
    count = [0]

    def pre(mod, args, kwargs):
        h = hidden[count[0]]
        count[0] += 1
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = block.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: Blocks, batches: list[torch.Tensor], device) -> BlockInputs:
    """Record what enters every block (block 0's hidden state; every block's other arguments) for each batch.

    The model's own forward runs with each block stood in for by a recorder that passes its hidden state through
    unchanged (:func:`passthrough`), so capturing costs the embeddings and whatever the model does between
    blocks, not a forward of the blocks; it stops at the last block. Block 0 runs for real once, to learn what a
    block returns (a tensor, or a tuple whose first item is the hidden state).
    """
    n = len(blocks)
    extra: list[list[tuple[tuple, dict]]] = [[] for _ in range(n)]
    hidden: list[torch.Tensor] = []

    def record(i, args, kwargs):
        rest = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        if extra[i]:  # share what equals the previous batch's
            prev_args, prev_kw = extra[i][-1]
            rest = (tuple(_dedup(a, p) for a, p in zip(rest[0], prev_args)),
                    {k: _dedup(v, prev_kw.get(k)) for k, v in rest[1].items()})
        extra[i].append(rest)
        if i == 0:
            hidden.append(_hidden_of(args, kwargs).detach())
        if i == n - 1:
            raise _Stop

    probe: list = []

    def learn(mod, args, kwargs, out):
        probe.append(isinstance(out, (tuple, list)))

    was_training = model.training
    model.eval()
    handle = blocks.modules[0].register_forward_hook(learn, with_kwargs=True)
    try:  # one real forward of two tokens says what blocks return
        model(input_ids=batches[0][:1, :2].to(device), use_cache=False)
    finally:
        handle.remove()
    returns_tuple = bool(probe and probe[0])
    try:
        with passthrough(blocks, n, returns_tuple, record):
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
                else:
                    raise RuntimeError("the model's forward never reached its last decoder block")
    finally:
        model.train(was_training)
    return BlockInputs(hidden=hidden, extra=extra, returns_tuple=returns_tuple)


@torch.no_grad()
def run_block(blocks: Blocks, i: int, inputs: BlockInputs, update: bool, hooks=None) -> None:
    """Run block ``i`` over every captured batch (``hooks.end_batch()`` after each); with ``update`` its outputs
    replace the hidden states, so that they are the inputs of block ``i + 1``."""
    block = blocks.modules[i]
    for b, h in enumerate(inputs.hidden):
        args, kwargs = inputs.extra[i][b]
        out = block(h, *args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if hooks is not None:
            hooks.end_batch()
        if update:
            inputs.hidden[b] = out


class BlockStore:
    """Statistics of one block at a time, as safetensors + JSON files ``<kind>-<block>`` under ``root``.

    Writes are atomic (a temporary file renamed into place), so a killed run leaves only whole files, and a rerun
    with the same key (the folder name) reuses every finished block.
    """

    def __init__(self, root: Path, writer: bool = True) -> None:
        self.root = Path(root)
        self.writer = writer  # under several processes only one writes into a shared folder

    def _paths(self, kind: str, i: int) -> tuple[Path, Path]:
        stem = f"{kind}-{i:04d}"
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.json"

    def has(self, kind: str, i: int) -> bool:
        tensors, meta = self._paths(kind, i)
        return tensors.exists() and meta.exists()

    def save(self, kind: str, i: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save_file

        if not self.writer:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path, meta_path = self._paths(kind, i)
        with atomic_file(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        write_text(meta_path, json.dumps(meta))  # the JSON last: it marks the block complete

    def load(self, kind: str, i: int, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load_file

        path, meta_path = self._paths(kind, i)
        return load_file(str(path), device=str(device)), json.loads(meta_path.read_text())


@dataclass
class Records:
    """What factoring some layers recorded: the damping rung of each whitening, AIR's objective before / after."""

    rungs: dict[str, str] = field(default_factory=dict)
    objective: dict[str, list[float]] = field(default_factory=dict)

    def add(self, other: Records) -> Records:
        self.rungs.update(other.rungs)
        self.objective.update(other.objective)
        return self

    def of(self, names: list[str]) -> Records:
        return Records({n: self.rungs[n] for n in names if n in self.rungs},
                       {n: self.objective[n] for n in names if n in self.objective})



def _maps_from(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        sig, name = key.split("::", 1)
        out.setdefault(sig, {})[name] = val
    return out


def _stats_from(tensors: dict, meta: dict, tokens: int) -> CalibrationStats:
    grams = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("gram::")}
    abs_sum = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("abs::")}
    return CalibrationStats(grams, abs_sum, meta["group_of"], tokens)


class BlockCache:
    """The per-block disk cache of one streamed compression, or a cache that holds nothing (``cache: false``).

    ``stats``: every block's dense Grams (``grams-<i>``) and influence maps (``<kind>-<i>``), keyed by the model's
    weights, the calibration tokens and the target names, so every later run on the same data reuses them.
    ``run``: this run's finished blocks' factors and records, keyed by the statistics and every compress setting,
    so a killed run resumes from its last finished block; removed when the run completes. Under several processes
    the main one writes and all read, and :attr:`stored` is what the main process saw before anything was written
    (every process must take the same branches: a block one process reads back while another computes it would
    leave a collective waiting).
    """

    def __init__(self, stats: BlockStore | None, run: BlockStore | None, kind: str, n_blocks: int,
                 device: torch.device):
        self.stats, self.run, self.kind, self.device = stats, run, kind, device
        stored = dist.broadcast_object({
            "grams": [i for i in range(n_blocks) if stats is not None and stats.has("grams", i)],
            "maps": [i for i in range(n_blocks) if stats is not None and stats.has(kind, i)]}, 0)
        self.stored = {k: set(v) for k, v in stored.items()}

    @classmethod
    def open(cls, model: nn.Module, windows: torch.Tensor, targets: dict, cfg, ranks: dict, kind: str,
             n_blocks: int, resume: bool = True) -> BlockCache:
        device = next(model.parameters()).device
        if not cfg.cache:
            return cls(None, None, kind, n_blocks, device)
        key = dist.broadcast_object(stats_key(model_fingerprint(model), windows, list(targets), "blocks"), 0)
        stats = BlockStore(stats_dir() / f"blocks-{key}", writer=dist.is_main())
        # what keys a study's compress stage keys the resume files: a setting that cannot change the factors
        # (progress, memory budgets, a lever's own settings while the lever is off, a field added at its neutral
        # value) leaves a killed run resumable
        run_key = hashlib.sha256(json.dumps([stats.root.name, result_fields(cfg), ranks], sort_keys=True,
                                            default=str).encode()).hexdigest()[:24]
        run = BlockStore(cache_root() / "runs" / run_key, writer=dist.is_main()) if resume else None
        return cls(stats, run, kind, n_blocks, device)

    @property
    def enabled(self) -> bool:
        return self.stats is not None

    def has_grams(self, i: int) -> bool:
        return i in self.stored["grams"]

    def has_maps(self, i: int) -> bool:
        return i in self.stored["maps"]

    def grams(self, i: int, tokens: int) -> CalibrationStats:
        return _stats_from(*self.stats.load("grams", i, self.device), tokens)

    def save_grams(self, i: int, st: CalibrationStats) -> None:
        self.stats.save("grams", i, {**{f"gram::{k}": v for k, v in st.grams.items()},
                                     **{f"abs::{k}": v for k, v in st.abs_sum.items()}},
                        {"group_of": st.group_of, "tokens": st.tokens})

    def maps(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        return _maps_from(self.stats.load(self.kind, i, self.device)[0])

    def save_maps(self, i: int, per: dict[str, dict[str, torch.Tensor]]) -> None:
        self.stats.save(self.kind, i, {f"{sig}::{n}": t for sig, m in per.items() for n, t in m.items()},
                        {"signals": sorted(per)})

    def finished(self, i: int) -> bool:
        return self.run is not None and self.run.has("factors", i)

    def save_factors(self, i: int, model: nn.Module, names: list[str], records: Records) -> None:
        """Block ``i``'s factors (as the model stores them) and records, for a resumed run."""
        if self.run is None:
            return
        tensors = {}
        for n in names:
            mod = model.get_submodule(n)
            if isinstance(mod, LowRankLinear):
                tensors[f"u::{n}"], tensors[f"v::{n}"] = mod.factor_u.weight, mod.factor_v.weight
        own = records.of(names)
        self.run.save("factors", i, tensors, {"rungs": own.rungs, "objective": own.objective})

    def restore(self, i: int, model: nn.Module, targets: dict[str, nn.Linear]) -> Records:
        """Swap in block ``i``'s stored factors; their records."""
        tensors, meta = self.run.load("factors", i)
        for key in [k for k in tensors if k.startswith("u::")]:
            name = key[3:]
            mod = targets[name]
            bias = mod.bias.detach() if mod.bias is not None else None
            set_module(model, name, LowRankLinear.from_factors(tensors[key], tensors[f"v::{name}"], bias,
                                                               dtype=mod.weight.dtype, device=mod.weight.device))
            targets[name] = model.get_submodule(name)  # the dense layer is freed
        return Records(meta["rungs"], meta["objective"])

    def close(self) -> None:
        """The run completed: its resume files are no longer needed."""
        if self.run is not None and self.run.writer:
            shutil.rmtree(self.run.root, ignore_errors=True)
