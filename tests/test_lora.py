"""PEFT LoRA on factored layers: targets per placement, merge math and merge exactness, budget accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import air_ft
from air_ft.lora import (
    LowRankLoraLinear,
    adapter_targets,
    apply_lora,
    concat_factors,
    lora_budget,
    merge_lora,
    truncate_factors,
)
from air_ft.modeling import LowRankLinear


def tiny_compressed(exclude: list[str] | None = None) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    air_ft.compress(model, None, None, method="svd", retention=0.6, progress=False, exclude=exclude or [])
    return model.eval()


def randomize_adapters(model: nn.Module) -> None:
    """PEFT starts lora_B at zero (a no-op adapter); give it values so that merges have something to merge."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def test_concat_factors_is_exact():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)
    b, a = torch.randn(12, 2, generator=g), torch.randn(2, 10, generator=g)
    u2, v2 = concat_factors(u, v, b, a, 0.5)
    assert u2.shape == (12, 5) and v2.shape == (5, 10)
    torch.testing.assert_close(u2 @ v2, u @ v + 0.5 * b @ a)


def test_truncate_factors_is_the_best_rank_k_approximation():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(6, 15, generator=g,
                                                                               dtype=torch.float64)
    u2, v2 = truncate_factors(u, v, 4)
    assert u2.shape == (20, 4) and v2.shape == (4, 15)
    uu, s, vh = torch.linalg.svd(u @ v)
    torch.testing.assert_close(u2 @ v2, (uu[:, :4] * s[:4]) @ vh[:4])


def test_targets_per_placement_and_dense_layers_get_ordinary_lora():
    model = tiny_compressed(exclude=[r"layers\.1\.mlp\.down_proj"])
    factors = adapter_targets(model, "factors")
    layer = adapter_targets(model, "layer")
    assert "model.layers.0.self_attn.q_proj.factor_u" in factors
    assert "model.layers.0.self_attn.q_proj.factor_v" in factors
    assert "model.layers.0.self_attn.q_proj" in layer
    # left dense by the engine: ordinary LoRA in both placements; never the LM head
    assert "model.layers.1.mlp.down_proj" in factors and "model.layers.1.mlp.down_proj" in layer
    assert not any("lm_head" in t for t in factors + layer)
    without_dense = [t for t in layer if t != "model.layers.1.mlp.down_proj"]
    assert adapter_targets(model, "layer", dense=[r"nothing"]) == without_dense
    with pytest.raises(ValueError, match="placement"):
        adapter_targets(model, "everywhere")

    peft_model = apply_lora(model, "layer", rank=4)
    wrapped = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, LowRankLoraLinear) and isinstance(wrapped.get_base_layer(), LowRankLinear)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("placement,merge", [("factors", "exact"), ("layer", "exact")])
def test_merge_reproduces_the_adapter_model(placement, merge):
    model = tiny_compressed(exclude=[r"layers\.1\.mlp\.down_proj"])
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    peft_model = apply_lora(model, placement, rank=4, alpha=8.0, merge=merge)
    randomize_adapters(peft_model)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=x).logits
    assert (before - plain).abs().max() > 1e-3  # the adapters do something
    merged = merge_lora(peft_model)
    assert merged is base and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        after = merged(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    new_ranks = {n: m.rank for n, m in merged.named_modules() if isinstance(m, LowRankLinear)}
    assert new_ranks == {n: k + (4 if placement == "layer" else 0) for n, k in ranks.items()}


def test_truncating_merge_keeps_rank_k_and_is_close_but_not_exact():
    model = tiny_compressed()
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    torch.manual_seed(3)  # the same lora_A initialization in both
    exact = apply_lora(copy.deepcopy(model), "layer", rank=4, merge="exact")
    torch.manual_seed(3)
    trunc = apply_lora(model, "layer", rank=4, merge="truncate")
    randomize_adapters(exact)
    randomize_adapters(trunc)
    exact, trunc = merge_lora(exact), merge_lora(trunc)
    assert {n: m.rank for n, m in trunc.named_modules() if isinstance(m, LowRankLinear)} == ranks
    for name in ranks:
        we, wt = exact.get_submodule(name).weight_product, trunc.get_submodule(name).weight_product
        # the best rank-k approximation of the exact merge
        uu, s, vh = torch.linalg.svd(we.double())
        k = ranks[name]
        torch.testing.assert_close(wt.double(), (uu[:, :k] * s[:k]) @ vh[:k], atol=1e-4, rtol=1e-4)


def test_budget_counts_adapters_against_retention():
    model = tiny_compressed()
    before = lora_budget(model)
    assert before["adapter_params"] == 0 and before["retention"] == before["retention_with_adapters"]
    dense = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, LowRankLinear))
    peft_model = apply_lora(model, "layer", rank=4)
    after = lora_budget(peft_model)
    adapters = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LowRankLinear))
    assert after["adapter_params"] == after["trainable_params"] == adapters
    assert after["dense_layer_params"] == dense and after["retention"] == pytest.approx(before["retention"])
    assert after["retention_with_adapters"] == pytest.approx(before["retention"] + adapters / dense)


def _dense_and_stats(tokenizer, text, seed: int = 0):
    from air_ft.compress import get_stats
    from air_ft.config import CompressConfig
    from air_ft.modeling import find_targets

    from .conftest import tiny_llama

    dense = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    cfg = CompressConfig(method="svdllm", num_samples=8, seq_len=32, progress=False)
    return dense, get_stats(dense, tokenizer, [text], find_targets(dense), cfg, influence=False)


def test_residual_init_extends_svdllm_from_rank_k_to_k_plus_r(tokenizer, text):
    """Base SVD-LLM(W) at rank k + adapters at the whitened top-r SVD of W - UV = SVD-LLM(W) at rank k + r."""
    from air_ft import linalg
    from air_ft.lora import residual_init

    dense, stats = _dense_and_stats(tokenizer, text)
    model = copy.deepcopy(dense)
    air_ft.compress(model, tokenizer, None, method="svdllm", retention=0.4, stats=stats, progress=False)
    peft_model = apply_lora(model, "layer", rank=3, alpha=6.0)
    report = residual_init(peft_model, dense, {n: stats.gram(n) for n in stats.group_of})
    assert len(report) == sum(isinstance(m, LowRankLoraLinear) for m in peft_model.modules()) == 14
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LowRankLoraLinear):
            continue
        base, dense_name = mod.get_base_layer(), name.removeprefix("base_model.model.")
        got = base.weight_product.double() + mod.get_delta_weight("default").double()
        w = dense.get_submodule(dense_name).weight.double()
        s, _ = linalg.whitening_factor(stats.gram(dense_name))
        uf, vf = linalg.back_project(*linalg.truncated_svd(w @ s, base.rank + 3), s)
        torch.testing.assert_close(got.detach(), uf @ vf, atol=1e-4 * float(w.abs().max()), rtol=1e-4)
        before, after = report[dense_name]
        assert after < before


def test_residual_init_with_enough_rank_reproduces_the_dense_model_and_merges_exactly(tokenizer, text):
    from air_ft.lora import residual_init

    dense, stats = _dense_and_stats(tokenizer, text)
    model = copy.deepcopy(dense)
    air_ft.compress(model, tokenizer, None, method="svdllm", retention=0.6, stats=stats, progress=False)
    peft_model = apply_lora(model, "layer", rank=64, alpha=16.0)  # r >= min(m, n) - k for every layer
    report = residual_init(peft_model, dense, {n: stats.gram(n) for n in stats.group_of})
    assert max(after for _, after in report.values()) < 1e-5
    x = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = dense(input_ids=x).logits
        got = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=x).logits - want).abs().max() > 1e-2  # compression hurt...
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ...and the residual adapters undo it
        merged = merge_lora(peft_model)
        torch.testing.assert_close(merged(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)


def test_residual_init_refuses_what_it_cannot_do(tokenizer, text):
    from air_ft.config import LoraConfig, RecipeError
    from air_ft.lora import residual_init

    with pytest.raises(RecipeError, match="needs lora.placement 'layer'"):
        LoraConfig(placement="factors", init="residual")
    with pytest.raises(RecipeError, match="lora.init 'nope' is unknown"):
        LoraConfig(placement="layer", init="nope")
    dense, stats = _dense_and_stats(tokenizer, text)
    model = copy.deepcopy(dense)
    air_ft.compress(model, tokenizer, None, method="svdllm", retention=0.6, stats=stats, progress=False)
    with pytest.raises(ValueError, match="needs the 'layer' placement"):
        residual_init(apply_lora(copy.deepcopy(model), "factors"), dense, {})
    with pytest.raises(RecipeError, match="no dense weight or calibration Gram"):
        residual_init(apply_lora(model, "layer"), dense, {})
    with pytest.raises(RecipeError, match="need the dense model"):
        air_ft.finetune(model, tokenizer, [text], placement="layer", lora_init="residual", distill=0.0)
