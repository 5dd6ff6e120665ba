"""The vLLM plugin's checks that need no vLLM: what a checkpoint must be to be served, and the errors otherwise.

The plugin serving real checkpoints is tested in tests/test_vllm.py (in an environment with vLLM).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points

import pytest

import air_ft
from air_ft.errors import AirFtError
from air_ft.serving import COVERED, ServeError, air_ft_ranks, check_servable, require_vllm
from air_ft.serving.measure import agreement

from .conftest import tiny_llama


def test_the_plugin_is_declared_to_vllm():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("air_ft") == "air_ft.serving:register"


def test_a_factored_checkpoint_of_a_covered_architecture_is_servable(tmp_path, tokenizer, text):
    model = tiny_llama(vocab_size=len(tokenizer))
    air_ft.compress(model, tokenizer, [text], method="svd", retention=0.5, num_samples=4, seq_len=16,
                    progress=False)
    path = air_ft.save_compressed(model, tokenizer, tmp_path / "ckpt")
    config = check_servable(path)
    assert config["architectures"] == ["LlamaForCausalLM"] and "LlamaForCausalLM" in COVERED
    ranks = air_ft_ranks(config)
    assert ranks and ranks == air_ft_ranks(model.config)
    assert all(name.startswith("model.layers.") for name in ranks)


def test_unservable_checkpoints_are_refused_in_one_line(tmp_path):
    with pytest.raises(AirFtError, match="no config.json"):
        check_servable(tmp_path / "missing")
    (tmp_path / "phi").mkdir()
    (tmp_path / "phi" / "config.json").write_text(json.dumps(
        {"architectures": ["Phi3ForCausalLM"], "air_ft": {"ranks": {"model.layers.0.mlp.down_proj": 8}}}))
    with pytest.raises(ServeError, match="export-dense") as err:
        check_servable(tmp_path / "phi")
    assert "\n" not in str(err.value) and "Phi3ForCausalLM" in str(err.value)
    (tmp_path / "phi" / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    assert check_servable(tmp_path / "phi")["architectures"] == ["Phi3ForCausalLM"]  # dense: vLLM's own


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(ServeError, match=r"pip install -e '\.\[vllm\]'"):
        require_vllm()


def test_agreement_counts_matching_tokens_and_logprob_gaps():
    served = [{"ids": [1, 2, 3], "logprobs": [-0.1, -0.2, -0.3]}, {"ids": [4, 5, 6], "logprobs": [-1.0, -1.0, -1.0]}]
    reference = [{"ids": [1, 2, 3], "logprobs": [-0.1, -0.25, -0.3]}, {"ids": [4, 9, 6], "logprobs": [-1.5, -9, -1]}]
    result = agreement(served, reference)
    assert result["equal"] == 1 and result["matched_tokens"] == [3, 1]
    assert result["max_logprob_diff"] == pytest.approx(0.5)  # the second prompt's first token; later ones unequal


def test_the_committed_serving_report_renders_from_its_json():
    """The report's vLLM table comes from report.json alone (``air-ft report`` re-renders it unchanged)."""
    from pathlib import Path

    from air_ft.report import markdown

    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve_smollm2_cpu"
    report = json.loads((out / "report.json").read_text())
    md = markdown(report)
    assert md == (out / "report.md").read_text()
    table = md.split("## Served with vLLM")[1].split("\n\n")[2].splitlines()
    assert len(table) == 2 + len(report["rows"]) and len({line.count("|") for line in table}) == 1
    dense = next(r for r in report["rows"] if r["method"] == "dense")["serve"]
    for row, line in zip(report["rows"], table[2:]):
        s = row["serve"]
        assert f"{s['decode_s_per_token'] * 1e3:.1f} ({s['decode_s_per_token'] / dense['decode_s_per_token']:.2f}x)" \
            in line
        assert f"{s['agreement']['equal']}/{s['agreement']['prompts']}" in line
