"""Perplexity as the field computes it: the text joined with "\\n\\n", tokenized once, cut into non-overlapping
windows, token-level ``exp(mean NLL)`` over every predicted token (docs/method.md section 7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from air_ft.data import token_windows, tokenize_joined
from air_ft.modeling import prepare_model

__all__ = ["perplexity", "evaluate_perplexity", "window_nll"]


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, tok, text: str | list[str], seq_len: int = 2048,
                        max_windows: int | None = None, batch_size: int = 1, progress: bool = False) -> dict:
    """Perplexity with its bookkeeping.

    Returns:
        ``{"ppl", "nll", "tokens" (predicted), "windows", "seq_len", "text_tokens"}``.
    """
    prepare_model(model)
    ids = tokenize_joined(tok, text)
    windows = token_windows(ids, seq_len, max_windows)
    mean, count = window_nll(model, windows, batch_size, progress)
    return {"ppl": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "tokens": count,
            "windows": int(windows.shape[0]), "seq_len": seq_len, "text_tokens": int(ids.numel())}


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False
               ) -> tuple[float, int]:
    """Mean next-token NLL over every predicted token of ``windows`` (``(N, T)`` token ids; inf once any batch is not
    finite), in eval mode, and the number of predicted tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            total = math.inf
            count += batch[:, 1:].numel()
            continue
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count, count


def perplexity(model: nn.Module, tok, text: str | list[str], seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1) -> float:
    """Token-level perplexity of ``text`` in non-overlapping ``seq_len`` windows."""
    return evaluate_perplexity(model, tok, text, seq_len, max_windows, batch_size)["ppl"]
