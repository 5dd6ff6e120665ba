"""air_ft's vLLM plugin on tiny factored models: vLLM serves them and its greedy generations equal air_ft's own.

Needs vLLM in the environment (skipped otherwise); the README's test command for the vLLM environment:

    python -m venv .venv-vllm && . .venv-vllm/bin/activate
    pip install "torch==2.13.0" -e ".[vllm,dev]" && pip uninstall -y torchvision torchaudio torchcodec
    python -m pytest -q tests/test_vllm.py

Each engine start takes 30-60 s on a 2-core CPU, so each test starts one engine and checks everything it can.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (see this module's docstring)")

from air_ft.checkpoint import export_dense, load_compressed, record_factoring, save_compressed  # noqa: E402
from air_ft.modeling import LowRankLinear, set_module  # noqa: E402
from air_ft.serving import layout  # noqa: E402
from air_ft.serving.measure import agreement, engine, greedy, reference_greedy  # noqa: E402

from .conftest import study_base  # noqa: E402

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the workers
PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [20, 21, 5, 30, 31], [33, 2, 14, 15, 16, 17, 18, 19]]
TOKENS = 32
ENGINE = {"enforce_eager": True, "max_model_len": 256, "kv_cache_memory_bytes": 32 << 20}


def tiny(arch: str, vocab: int, bias: bool = False):
    """A 2-layer model of ``arch`` with head size 64 and grouped-query attention (4 query, 2 key/value heads)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, head_dim=64)
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, attention_bias=bias, mlp_bias=bias)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # q/k/v biases
        cfg = transformers.Qwen2Config(**{k: v for k, v in common.items() if k != "head_dim"},
                                       tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=64, sliding_window=64,
                                            layer_types=["sliding_attention", "full_attention"])
        model = transformers.Gemma3ForCausalLM(cfg)
    elif arch == "phi3":  # an architecture the plugin does not cover
        cfg = transformers.Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"}, pad_token_id=0)
        model = transformers.Phi3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # biases drawn, not zero, so that a misplaced bias shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model.eval()


def factor(model, skip=(), seed: int = 1):
    """Factor every decoder linear layer by truncated SVD at a different random rank, keeping ``skip`` dense."""
    g = torch.Generator().manual_seed(seed)
    for name, lin in list(model.named_modules()):
        if isinstance(lin, torch.nn.Linear) and ".layers." in name and not name.endswith(tuple(skip)):
            k = int(torch.randint(8, 48, (1,), generator=g))
            u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
            set_module(model, name, LowRankLinear.from_factors(u[:, :k] * s[:k], vh[:k], lin.bias,
                                                               torch.float32, "cpu"))
    record_factoring(model, "svd", 0.5)
    return model


def check_equal(path, llm) -> dict:
    served, ref = greedy(llm, PROMPTS, TOKENS), reference_greedy(path, PROMPTS, TOKENS)
    result = agreement(served, ref)
    assert result["equal"] == len(PROMPTS), result
    assert result["max_logprob_diff"] < 1e-4, result
    return result


def layer_kinds(llm) -> list[dict]:
    """Per rank: projection -> (its class, {parameter: shape})."""
    return llm.apply_model(layout)


def test_factored_llama_with_dense_layers_serves_like_air_ft(tmp_path, tokenizer):
    """Heterogeneous ranks, one dense member of q/k/v and one dense row projection, biases everywhere."""
    model = factor(tiny("llama", len(tokenizer), bias=True), skip=("layers.1.self_attn.k_proj",
                                                                   "layers.0.mlp.down_proj"))
    path = save_compressed(model, tokenizer, tmp_path / "ckpt")
    with engine(path, **ENGINE) as llm:
        check_equal(path, llm)
        kinds = layer_kinds(llm)[0]
        assert kinds["model.layers.0.self_attn.qkv_proj"][0] == "FactoredColumnParallel"
        assert kinds["model.layers.0.mlp.down_proj"][0] == "RowParallelLinear"  # left dense: vLLM's own layer
        assert kinds["model.layers.1.mlp.down_proj"][0] == "FactoredRowParallel"
        ranks = model.config.air_ft["ranks"]
        qkv = kinds["model.layers.1.self_attn.qkv_proj"][1]  # k left dense: V stacks q's and v's only
        assert qkv["factor_v"] == [ranks["model.layers.1.self_attn.q_proj"] + ranks["model.layers.1.self_attn.v_proj"],
                                   256]
        assert qkv["members.1"] == [128, 256]


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3"])
def test_factored_architectures_serve_like_air_ft(tmp_path, tokenizer, arch):
    model = factor(tiny(arch, len(tokenizer)))
    path = save_compressed(model, tokenizer, tmp_path / "ckpt")
    with engine(path, **ENGINE) as llm:
        check_equal(path, llm)
        assert all(k == "FactoredColumnParallel" for n, (k, _) in layer_kinds(llm)[0].items() if "qkv" in n)


def test_tensor_parallel_shards_factors(tmp_path, tokenizer):
    """TP 2: U of q/k/v and gate/up split by output rows, V of o/down by input columns, outputs unchanged."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism on CPU needs a core per rank")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (one NUMA node here)
    model = factor(tiny("llama", len(tokenizer), bias=True))
    path = save_compressed(model, tokenizer, tmp_path / "ckpt")
    with engine(path, tensor_parallel_size=2, **ENGINE) as llm:
        check_equal(path, llm)
        ranks = {n.removeprefix("model.layers.0."): k for n, k in model.config.air_ft["ranks"].items()
                 if n.startswith("model.layers.0.")}
        layouts = layer_kinds(llm)
        assert len(layouts) == 2  # one per rank
        for kinds in layouts:
            qkv = kinds["model.layers.0.self_attn.qkv_proj"][1]
            assert qkv["factor_v"] == [sum(ranks[f"self_attn.{p}_proj"] for p in "qkv"), 256]  # V whole
            assert qkv["members.0"] == [128, ranks["self_attn.q_proj"]]  # U_q: 2 of the 4 query heads
            assert qkv["members.1"] == [64, ranks["self_attn.k_proj"]]  # U_k: 1 of the 2 key/value heads
            down = kinds["model.layers.0.mlp.down_proj"][1]
            assert down["factor_v"] == [ranks["mlp.down_proj"], 256]  # V: half of the 512 input columns
            assert down["factor_u"] == [256, ranks["mlp.down_proj"]]  # U whole


def test_merged_lora_checkpoint_serves_like_air_ft(tmp_path, tokenizer, text):
    """A LoRA merged at layer placement (rank k + r) is just another ranks map."""
    from air_ft.lora import apply_lora, merge_lora

    model = factor(tiny("llama", len(tokenizer)))
    before = dict(model.config.air_ft["ranks"])
    peft_model = apply_lora(model, placement="layer", rank=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged = merge_lora(peft_model)
    record_factoring(merged)
    path = save_compressed(merged, tokenizer, tmp_path / "merged")
    assert merged.config.air_ft["ranks"] == {name: k + 4 for name, k in before.items()}
    with engine(path, **ENGINE) as llm:
        check_equal(path, llm)


def test_unsupported_architecture_is_refused_in_one_line(tmp_path, tokenizer):
    """A factored checkpoint of an architecture the plugin does not cover never falls back to dense."""
    model = factor(tiny("phi3", len(tokenizer)))
    path = save_compressed(model, tokenizer, tmp_path / "ckpt")
    with pytest.raises(Exception, match="export-dense"):
        vllm.LLM(str(path), dtype="float32", **ENGINE)
    dense = export_dense(load_compressed(path)[0], tokenizer, tmp_path / "dense")  # what the message says to do
    assert not (dense / "air_ft.json").exists()


def test_a_study_with_eval_serve_reports_vllm_figures_against_dense(tmp_path, tokenizer, text):
    """``eval.serve: true``: one stage serves dense and every compressed row in turn; the report shows it."""
    import json

    import yaml

    from air_ft.cli import main

    recipe = {**study_base(tmp_path, tiny("llama", len(tokenizer)), tokenizer, text),
              "compress": {"retention": 0.5, "num_samples": 8, "seq_len": 32, "progress": False},
              "eval": {"seq_len": 32, "max_windows": 2, "tasks": [], "efficiency": False, "serve": True,
                       "serve_batch_sizes": [2, 4], "serve_tokens": 8, "serve_prompt_len": 16, "serve_rounds": 1,
                       "serve_engine": ENGINE},
              "study": {"methods": ["svdllm"], "retentions": [0.5], "lora": False}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", "--recipe", str(tmp_path / "study.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    dense, svdllm = report["rows"]
    for row in (dense, svdllm):
        serve = row["serve"]
        assert serve["agreement"]["equal"] == serve["agreement"]["prompts"] == 4, serve["agreement"]
        assert set(serve["throughput_tokens_per_s"]) == {"2", "4"} and serve["kv_cache"]["tokens"] > 0
    assert (tmp_path / "out" / "stages" / "serve" / "dense" / "config.json").exists() is False  # a local HF dir
    assert svdllm["serve"]["vs_reference"]["weight_bytes"] < 1 == dense["serve"]["vs_reference"]["weight_bytes"]
    assert "## Served with vLLM" in (tmp_path / "out" / "report.md").read_text()
