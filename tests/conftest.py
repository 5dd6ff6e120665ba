"""Tiny in-process models, tokenizers and text: no downloads, CPU, seconds."""

from __future__ import annotations

import random

import pytest
import torch

WORDS = ("the king queen castle river army of and in to was his her a an old new city war peace lord lady "
         "play poem act scene church year born died wrote english london stratford globe theatre").split()


def make_text(n_words: int = 6000, seed: int = 0) -> str:
    """Structured synthetic prose: a Markov chain over a small vocabulary, so a model can learn something."""
    rng = random.Random(seed)
    out, prev = [], 0
    for i in range(n_words):
        prev = (prev * 7 + rng.choice((1, 2, 3))) % len(WORDS) if rng.random() < 0.8 else rng.randrange(len(WORDS))
        out.append(WORDS[prev])
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIR_FT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text() -> str:
    return make_text()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A word-level fast tokenizer over the synthetic vocabulary, saved and reloadable like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, ".": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    return tok


def tiny_llama(vocab_size: int = 64, tie: bool = False, seed: int = 0, layers: int = 2, bias: bool = False):
    """A 2-layer LLaMA with hidden 64 and grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer))
