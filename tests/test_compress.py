"""The compression stage: every method runs, AIR(delta=0) is SVD-LLM(W), AIR lowers its own objective, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import air_ft
from air_ft import linalg, native
from air_ft.config import RecipeError
from air_ft.modeling import LowRankLinear

from .conftest import tiny_llama

KW = dict(num_samples=8, seq_len=32, progress=False)


@pytest.mark.parametrize("method", ["svd", "asvd", "fwsvd", "svdllm", "air"])
def test_every_method_factors_every_decoder_linear(method, model, tokenizer, text):
    info = air_ft.compress(model, tokenizer, [text], method=method, retention=0.6, **KW)
    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(factored) == 14 and "lm_head" not in str(list(factored))
    # GQA: k/v are (2 heads * 16) x 64, ranks from the real shapes
    kp = factored["model.layers.0.self_attn.k_proj"]
    assert (kp.out_features, kp.in_features, kp.rank) == (32, 64, linalg.rank_for_retention(32, 64, 0.6))
    assert kp.factor_u.weight.shape == (32, kp.rank) and kp.factor_v.weight.shape == (kp.rank, 64)
    assert info.linear_params_after <= 0.6 * info.linear_params_before
    assert 0.5 < info.retention_actual <= 0.6
    assert info.model_params_after < info.model_params_before
    logits = model(input_ids=torch.arange(10)[None]).logits
    assert torch.isfinite(logits).all()


def test_rank_multiple_aligns_every_rank_and_stays_within_the_budget(tokenizer, text):
    model = tiny_llama(vocab_size=len(tokenizer), layers=1)
    info = air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.6, rank_multiple=8, **KW)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks and all(k % 8 == 0 for k in ranks.values()), ranks
    assert info.retention_actual <= 0.6
    for name, k in ranks.items():  # each the largest multiple of 8 under that layer's exact rank
        mod = model.get_submodule(name)
        exact = linalg.rank_for_retention(mod.out_features, mod.in_features, 0.6)
        assert exact - 8 < k <= exact
    with pytest.raises(RecipeError, match="rank_multiple"):
        air_ft.compress(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], rank_multiple=0, **KW)


def test_air_with_delta_zero_is_svdllm_exactly(model, tokenizer, text):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    air_ft.compress(a, tokenizer, [text], method="air", retention=0.5, delta=0.0, **KW)
    air_ft.compress(b, tokenizer, [text], method="svdllm", retention=0.5, **KW)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_air_lowers_the_weighted_objective_of_every_layer(model, tokenizer, text):
    info = air_ft.compress(model, tokenizer, [text], method="air", retention=0.5, delta=2.0, **KW)
    assert len(info.objective) == 14
    for name, (start, end) in info.objective.items():
        assert end <= start * (1 + 1e-6), name
    assert sum(e < s * (1 - 1e-4) for s, e in info.objective.values()) >= 10


@pytest.mark.skipif(not native.available(), reason="no C compiler for the fused ALS kernel")
def test_air_backends_agree(model, tokenizer, text):
    """The fused C kernel (default on CPU) and the torch reference produce the same compressed model."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    # the dense model's Grams for every block: with `sequential` a rounding difference in one block's factors
    # would change the next block's inputs, hence its starting objective
    kw = {**KW, "sequential": False}
    ia = air_ft.compress(a, tokenizer, [text], method="air", retention=0.5, als_backend="native", **kw)
    ib = air_ft.compress(b, tokenizer, [text], method="air", retention=0.5, als_backend="torch", **kw)
    for name, (start, end) in ia.objective.items():
        assert start == ib.objective[name][0] and end == pytest.approx(ib.objective[name][1], rel=1e-5)
    ids = torch.arange(10)[None]
    assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-4)


def test_air_changes_the_factors_relative_to_svdllm(model, tokenizer, text):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    air_ft.compress(a, tokenizer, [text], method="air", retention=0.5, delta=1.0, **KW)
    air_ft.compress(b, tokenizer, [text], method="svdllm", retention=0.5, **KW)
    name = "model.layers.0.mlp.down_proj"
    assert not torch.allclose(a.get_submodule(name).weight_product, b.get_submodule(name).weight_product)


def test_bias_is_kept(tokenizer, text):
    m = tiny_llama(vocab_size=len(tokenizer), bias=True)
    bias = m.model.layers[0].self_attn.q_proj.bias.detach().clone()
    air_ft.compress(m, tokenizer, [text], method="svdllm", retention=0.6, **KW)
    assert torch.equal(m.model.layers[0].self_attn.q_proj.factor_u.bias, bias)


def test_include_exclude_regexes(model, tokenizer, text):
    info = air_ft.compress(model, tokenizer, [text], method="svd", retention=0.6, include=[r"mlp\."],
                           exclude=["down_proj"], progress=False)
    assert sorted(info.ranks) == sorted(f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj",
                                                                                                   "up_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_calibration_is_cached_across_retentions(model, tokenizer, text):
    first = air_ft.compress(copy.deepcopy(model), tokenizer, [text], method="air", retention=0.6, **KW)
    second = air_ft.compress(copy.deepcopy(model), tokenizer, [text], method="air", retention=0.4, delta=1.0, **KW)
    third = air_ft.compress(copy.deepcopy(model), tokenizer, [text], method="svdllm", retention=0.4, **KW)
    assert not first.calibration_cached and second.calibration_cached and third.calibration_cached


def test_whitened_influence_runs_a_cached_second_pass(model, tokenizer, text):
    plain = air_ft.compress(copy.deepcopy(model), tokenizer, [text], method="air", retention=0.5,
                            influence="fisher", **KW)
    white = air_ft.compress(copy.deepcopy(model), tokenizer, [text], method="air", retention=0.5,
                            influence="fisher_whitened", **KW)
    again = air_ft.compress(copy.deepcopy(model), tokenizer, [text], method="air", retention=0.4,
                            influence="fisher_whitened", **KW)
    assert not white.calibration_cached and again.calibration_cached
    for name, (start, end) in white.objective.items():
        assert end <= start * (1 + 1e-6), name
    # another signal, so other weights and other factors than the plain Fisher
    assert white.objective != plain.objective


@pytest.mark.parametrize("kwargs,match", [
    (dict(retention=1.5), "strictly between 0 and 1"),
    (dict(retention=0.0), "strictly between 0 and 1"),
    (dict(method="magic"), "choose one of"),
    (dict(influence="lrp2"), "influence"),
    (dict(include=["does_not_exist"]), "no nn.Linear layer matches"),
    (dict(bogus_option=3), r"unknown key\(s\) \['compress.bogus_option'\]"),
    (dict(delta=-1.0), "delta must be >= 0"),
    (dict(num_samples=0), "num_samples must be an integer >= 1"),
])
def test_bad_input_is_rejected_before_work(model, tokenizer, text, kwargs, match):
    opts = {**KW, "method": "air", "retention": 0.6, **kwargs}
    with pytest.raises(RecipeError, match=match):
        air_ft.compress(model, tokenizer, [text], **opts)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_model_without_linear_layers_is_rejected(tokenizer):
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 1)

    with pytest.raises(RecipeError, match="no nn.Linear layer"):
        air_ft.compress(Conv(), tokenizer, ["x"], method="svd", retention=0.5)


def test_retention_that_saves_nothing_is_rejected(tokenizer):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(RecipeError, match="saves nothing"):
        air_ft.compress(Tiny(), tokenizer, None, method="svd", retention=0.9)


def test_methods_needing_data_say_so(model, tokenizer):
    with pytest.raises(RecipeError, match="needs calibration texts"):
        air_ft.compress(model, tokenizer, [], method="svdllm", retention=0.6)


def test_svdllm_does_not_depend_on_the_square_root_but_air_does(model, tokenizer, text):
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    air_ft.compress(a, tokenizer, [text], method="svdllm", retention=0.5, whitening="cholesky", **KW)
    air_ft.compress(b, tokenizer, [text], method="svdllm", retention=0.5, whitening="symmetric", **KW)
    air_ft.compress(c, tokenizer, [text], method="air", retention=0.5, whitening="symmetric", delta=1.0, **KW)
    name = "model.layers.1.mlp.gate_proj"
    wa, wb, wc = (m.get_submodule(name).weight_product.detach() for m in (a, b, c))
    assert torch.allclose(wa, wb, atol=1e-4 * float(wa.abs().max()))
    assert not torch.allclose(wa, wc, atol=1e-3 * float(wa.abs().max()))


def test_compress_returns_a_typed_result_that_still_reads_as_the_old_dict(model, tokenizer, text):
    from air_ft.compress import CompressResult

    result = air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, num_samples=4, seq_len=32,
                             progress=False, cache=False)
    assert isinstance(result, CompressResult) and result.method == "svdllm"
    factored = {n: m.rank for n, m in model.named_modules() if isinstance(m, air_ft.LowRankLinear)}
    assert {n: k for n, k in result.ranks.items() if k is not None} == factored
    assert result.linear_params_after == sum(k * (m.in_features + m.out_features) for n, m in model.named_modules()
                                             if isinstance(m, air_ft.LowRankLinear) for k in [m.rank])
    assert result.retention_actual == result.linear_params_after / result.linear_params_before
    assert model.config.air_ft == {"method": "svdllm", "retention": 0.5, "ranks": factored}
    as_json = result.to_json(objective=False)
    assert "objective" not in as_json and as_json["ranks"] == result.ranks and as_json["stream"]["blocks"] == 2
    with pytest.warns(DeprecationWarning, match="result.ranks"):
        assert result["ranks"] == result.ranks
