"""Decoder-block streaming: the machinery that keeps compression memory bounded by one block.

The hidden states entering decoder block 0 are captured once for every calibration batch (the model's forward
with its blocks passed through), together with the keyword arguments each block receives (position embeddings,
masks; captured per block, since models with sliding-window layers pass different masks to different blocks). A
block is then run on its own over those hidden states, with hooks that accumulate its statistics, and its outputs
become the next block's inputs. Statistics of finished blocks live on disk (:class:`BlockStore`), never all in
memory.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from air_ft.errors import RecipeError
from air_ft.files import atomic_file, write_text

__all__ = ["Blocks", "find_blocks", "BlockInputs", "capture_inputs", "run_block", "BlockStore", "passthrough",
           "inject"]


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
