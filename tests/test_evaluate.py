"""Perplexity follows the field's convention: joined text, non-overlapping windows, token-level exp(mean NLL)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import air_ft
from air_ft.data import token_windows, tokenize_joined


def test_perplexity_equals_manual_computation(model, tokenizer, text):
    res = air_ft.evaluate_perplexity(model, tokenizer, [text[:2000], text[2000:4000]], seq_len=16, batch_size=3)
    ids = tokenizer(text[:2000] + "\n\n" + text[2000:4000], add_special_tokens=False).input_ids
    n = len(ids) // 16
    total = 0.0
    for w in range(n):
        chunk = torch.tensor(ids[w * 16:(w + 1) * 16])[None]
        with torch.no_grad():
            logits = model(input_ids=chunk).logits[0, :-1]
        total += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
    assert res["windows"] == n and res["tokens"] == n * 15
    assert math.isclose(res["ppl"], math.exp(total / (n * 15)), rel_tol=1e-5)
    assert air_ft.perplexity(model, tokenizer, [text[:2000], text[2000:4000]], seq_len=16) == pytest.approx(
        air_ft.perplexity(model, tokenizer, [text[:2000], text[2000:4000]], seq_len=16, batch_size=7), rel=1e-6)


def test_windows_are_non_overlapping_and_capped_evenly(tokenizer, text):
    ids = tokenize_joined(tokenizer, text)
    w = token_windows(ids, 10)
    assert torch.equal(w.flatten(), ids[: w.numel()])
    capped = token_windows(ids, 10, max_windows=3)
    assert torch.equal(capped[0], w[0]) and torch.equal(capped[-1], w[-1]) and capped.shape == (3, 10)
