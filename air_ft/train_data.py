"""The data of LoRA recovery: raw texts packed into token blocks (each source its share), and instruction records
(prompt / completion, or ``messages`` conversations) from local files or HF datasets."""

from __future__ import annotations

import torch

from air_ft.config import TrainConfig
from air_ft.errors import DataError, RecipeError

__all__ = ["check_text_weights", "text_blocks", "blocks_dataset", "instruction_dataset", "build_datasets"]


def check_text_weights(weights: list[float] | None, n: int) -> list[float]:
    """One positive share per training text (``None``: equal shares), or a RecipeError that says what is wrong."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n or any(not w > 0 for w in weights):
        raise RecipeError(f"need one positive weight per training text; got {weights} for {n} texts")
    return list(weights)


def text_blocks(tok, texts: list[str], seq_len: int, num_blocks: int | None = None, seed: int = 0,
                weights: list[float] | None = None) -> torch.Tensor:
    """Pack raw texts into ``(num_blocks, seq_len)`` token blocks, each source contributing an equal share (or its
    share of ``weights``).

    Each text is tokenized once and cut into non-overlapping blocks (the tail is dropped); blocks are then taken
    from the sources in turn, each source in a seeded random order that is re-shuffled when it runs out (a short
    source is repeated rather than drowned). ``num_blocks=None`` gives one pass over the longest source per source.
    With ``weights`` the sources take turns by smooth weighted round robin: after ``N`` blocks every source has
    ``N w_s / sum(w)`` of them to within one block, interleaved; equal weights give the plain alternation.
    """
    from air_ft.data import token_windows, tokenize_joined

    weights = check_text_weights(weights, len(texts))
    per_source, kept = [], []
    for text, w in zip(texts, weights):
        ids = tokenize_joined(tok, text)
        if ids.numel() >= seq_len:
            per_source.append(token_windows(ids, seq_len))
            kept.append(float(w))
    if not per_source:
        raise DataError(f"no training text has {seq_len} tokens; give more text or a shorter train.seq_len")
    weights = kept
    gen = torch.Generator().manual_seed(seed)
    if num_blocks is None:
        num_blocks = len(per_source) * max(b.shape[0] for b in per_source)
    orders = [torch.empty(0, dtype=torch.long) for _ in per_source]
    credit, total = [0.0] * len(per_source), sum(weights)
    out = []
    for _ in range(num_blocks):
        credit = [c + w for c, w in zip(credit, weights)]
        s = max(range(len(credit)), key=lambda j: (credit[j], -j))  # ties: the earlier source
        credit[s] -= total
        if orders[s].numel() == 0:
            orders[s] = torch.randperm(per_source[s].shape[0], generator=gen)
        out.append(per_source[s][orders[s][0]])
        orders[s] = orders[s][1:]
    return torch.stack(out)


def blocks_dataset(blocks: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks.tolist()})


def instruction_dataset(specs: list[dict]):
    """Prompt/completion or ``messages`` records from local ``.json``/``.jsonl`` files or HF datasets by name.

    ``messages`` conversations become conversational prompt/completion pairs (the last turn is the completion),
    so the loss falls on the answer only.
    """
    import datasets

    parts = []
    for spec in specs:
        source, split = spec["source"], spec.get("split", "train")
        if source.endswith((".json", ".jsonl")):
            ds = datasets.load_dataset("json", data_files=source, split="train")
        else:
            ds = datasets.load_dataset(source, spec.get("subset"), split=split)
        if spec.get("max_docs"):
            ds = ds.select(range(min(int(spec["max_docs"]), len(ds))))
        cols = set(ds.column_names)
        if "messages" in cols:
            ds = ds.map(lambda ex: {"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]},
                        remove_columns=ds.column_names)
        elif not {"prompt", "completion"} <= cols:
            raise RecipeError(f"instruction data {source!r} needs 'prompt' and 'completion' or 'messages' fields; "
                              f"it has {sorted(cols)}")
        else:
            ds = ds.select_columns(["prompt", "completion"])
        parts.append(ds)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def build_datasets(tok, cfg: TrainConfig, train_texts, eval_texts, world: int, weights: list[float] | None = None):
    """Training and held-out datasets: packed blocks for ``text``, records for ``instruction``."""
    if cfg.data_format == "instruction":
        return train_texts, eval_texts  # already datasets of prompt/completion records
    needed = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world
    train = blocks_dataset(text_blocks(tok, train_texts, cfg.seq_len, needed, cfg.seed, weights))
    evald = None
    if eval_texts:
        evald = blocks_dataset(text_blocks(tok, eval_texts, cfg.seq_len, cfg.eval_blocks, cfg.seed))
    return train, evald
