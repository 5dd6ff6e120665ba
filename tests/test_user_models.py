"""Models that users load themselves, not through ``air_ft.load_model``: from GGUF by transformers, in bf16, with
tied embeddings; and inference-only quantized models, which are refused with a message."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import air_ft
from air_ft.config import RecipeError
from air_ft.modeling import LowRankLinear

from .conftest import tiny_llama, write_gguf


def _chain(model, tok, text, tmp_path) -> tuple[float, float]:
    """The public chain of the README: compress -> finetune -> save -> load -> perplexity (in memory, reloaded)."""
    air_ft.compress(model, tok, [text], method="air", retention=0.6, num_samples=4, seq_len=32, seed=0,
                    progress=False)
    tuned = air_ft.finetune(model, tok, [text], max_steps=2, lora_rank=2, learning_rate=1e-3, seq_len=32,
                            batch_size=2, seed=0, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in tuned.modules())
    air_ft.save_compressed(tuned, tok, tmp_path / "ckpt")
    loaded, _ = air_ft.load_compressed(tmp_path / "ckpt")
    return (air_ft.perplexity(tuned, tok, text[:3000], seq_len=32),
            air_ft.perplexity(loaded, tok, text[:3000], seq_len=32))


def test_public_chain_on_a_model_transformers_loaded_from_gguf(tmp_path, tokenizer, text):
    source = tiny_llama(vocab_size=len(tokenizer), tie=True)
    write_gguf(source, tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert model.is_quantized and model.config.tie_word_embeddings  # what transformers hands the user
    ids = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():  # the file really holds the source model
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-5)
    in_memory, reloaded = _chain(model, tokenizer, text, tmp_path)
    assert math.isfinite(in_memory) and in_memory == pytest.approx(reloaded, rel=1e-5)


def test_public_chain_on_a_bf16_model(tmp_path, tokenizer, text):
    model = tiny_llama(vocab_size=len(tokenizer)).to(torch.bfloat16)
    in_memory, reloaded = _chain(model, tokenizer, text, tmp_path)
    assert math.isfinite(in_memory) and in_memory == pytest.approx(reloaded, rel=1e-3)
    assert next(air_ft.load_compressed(tmp_path / "ckpt")[0].parameters()).dtype == torch.bfloat16


def test_an_inference_quantized_model_is_refused_with_what_to_do(model, tokenizer, text):
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    for call in (lambda: air_ft.compress(model, tokenizer, [text], method="svd", retention=0.5, progress=False),
                 lambda: air_ft.finetune(model, tokenizer, [text], max_steps=1, seq_len=16, batch_size=1),
                 lambda: air_ft.perplexity(model, tokenizer, text[:500], seq_len=16)):
        with pytest.raises(RecipeError, match=r"quantized with 'bitsandbytes'.*load it unquantized"):
            call()


def test_qwen2_qkv_biases_survive_compression_lora_merge_and_checkpoint(tmp_path, tokenizer, text):
    """Qwen2.5's q/k/v projections carry biases (o_proj and the MLP do not): the default compression keeps each bias
    on the factored layer's output, LoRA trains beside it and merges without touching it, the checkpoint reloads it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    with torch.no_grad():  # random but non-zero biases, so that losing one shows
        for layer in model.model.layers:
            for p in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, p).bias.normal_()
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")]
    biases = {n: model.get_submodule(n).bias.detach().clone() for n in names}
    assert model.model.layers[0].self_attn.o_proj.bias is None
    air_ft.compress(model, tokenizer, [text], retention=0.6, num_samples=4, seq_len=32, seed=0, progress=False)
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, LowRankLinear) and torch.equal(layer.factor_u.bias, biases[n]), n
        assert layer.factor_v.bias is None
    tuned, _ = air_ft.finetune(model, tokenizer, [text], max_steps=2, lora_rank=2, learning_rate=1e-3, seq_len=32,
                               batch_size=2, seed=0, progress=False, return_summary=True)
    for n in names:  # LoRA adapts the factors, never the bias
        assert torch.equal(tuned.get_submodule(n).factor_u.bias, biases[n]), n
    air_ft.save_compressed(tuned, tokenizer, tmp_path / "ckpt")
    loaded, _ = air_ft.load_compressed(tmp_path / "ckpt")
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tuned(ids).logits, atol=1e-5)
    for n in names:
        assert torch.equal(loaded.get_submodule(n).factor_u.bias, biases[n]), n
