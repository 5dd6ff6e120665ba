"""The compression stage: every method runs, AIR(delta=0) is SVD-LLM(W), AIR lowers its own objective, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import air_ft
from air_ft import curvature, linalg, native
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
    (dict(output_weight=1.5), "output_weight must be a number from 0 to 1"),
    (dict(method="asvd", output_weight=0.5), "output_weight applies to the whitened methods"),
    (dict(rank_allocation="best"), "rank_allocation must be 'uniform' or 'global'"),
    (dict(method="svd", rank_allocation="global"), "does not read; use rank_allocation: uniform"),
    (dict(rank_floor=0.0), "0 < rank_floor <= 1 <= rank_ceiling"),
    (dict(rank_ceiling=0.5), "0 < rank_floor <= 1 <= rank_ceiling"),
    (dict(method="svdllm", output_weight=0.5, als_output_side=True), "does not run; set als_output_side: false"),
    (dict(als_output_side="yes"), "als_output_side must be true or false"),
    (dict(delta="often"), "delta must be a number >= 0 or 'auto'"),
    (dict(method="svdllm", delta="auto"), "which method 'svdllm' does not run; set a number"),
    (dict(delta="auto", delta_candidates=[]), "delta_candidates must be a non-empty list"),
    (dict(delta="auto", delta_candidates=[1.0, -2.0]), "delta_candidates must be a non-empty list"),
    (dict(delta="auto", num_samples=1), "it needs num_samples >= 2"),
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


def test_output_weight_gives_the_two_sided_solution_and_air_starts_its_sweep_there(model, tokenizer, text):
    """svdllm with output_weight lowers tr(H_w dW G dW^T) of every layer below SVD-LLM(W)'s (its closed form is that
    metric's optimum); AIR's sweep starts from it and never raises its own objective."""
    from air_ft.calibration import OGRAD
    from air_ft.compress import get_stats
    from air_ft.config import CompressConfig
    from air_ft.modeling import find_targets

    cfg = CompressConfig(method="svdllm", output_weight=0.5, **KW)
    stats = get_stats(model, tokenizer, [text], find_targets(model), cfg, influence=True)
    dense = {n: m.weight.detach().double().clone() for n, m in find_targets(model).items()}
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    air_ft.compress(one, tokenizer, method="svdllm", retention=0.5, stats=stats, **KW)
    air_ft.compress(two, tokenizer, method="svdllm", retention=0.5, stats=stats, output_weight=0.5, **KW)
    for name, w in dense.items():
        lf, _ = curvature.output_factor(stats.influence[OGRAD][name], 0.5)
        h, g = lf @ lf.T, stats.gram(name)

        d1, d2 = (w - m.get_submodule(name).weight_product.detach().double() for m in (one, two))
        assert torch.trace(h @ d2 @ g @ d2.T) < torch.trace(h @ d1 @ g @ d1.T) * (1 - 1e-6), name
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    air = dict(method="air", retention=0.5, stats=stats, influence="fisher", **KW)  # the maps of this pass
    plain = air_ft.compress(a, tokenizer, **air)
    started = air_ft.compress(b, tokenizer, output_weight=0.5, **air)
    for name, (start, end) in started.objective.items():
        assert end <= start * (1 + 1e-6), name
        assert start != plain.objective[name][0], name  # another starting point
    zero = air_ft.compress(copy.deepcopy(model), tokenizer, output_weight=0.0, **air)
    assert zero.objective == plain.objective  # 0 is the input-only problem, bit for bit
    stale = copy.deepcopy(stats)
    stale.influence.pop(OGRAD)
    with pytest.raises(RecipeError, match="no 'ograd'"):
        air_ft.compress(copy.deepcopy(model), tokenizer, method="svdllm", retention=0.5, stats=stale,
                        output_weight=0.5, **KW)


def test_global_rank_allocation_stays_in_budget_and_its_checkpoint_works_like_a_uniform_one(tokenizer, text,
                                                                                          tmp_path):
    """Heterogeneous ranks from the loss-weighted spectra: the uniform budget holds, the streamed pass gives the
    ranks of the all-at-once statistics, and the model saves, reloads, merges LoRA, fuses and exports."""
    from air_ft.checkpoint import export_dense, load_compressed, save_compressed
    from air_ft.compress import get_stats
    from air_ft.config import CompressConfig
    from air_ft.lora import apply_lora, merge_lora
    from air_ft.modeling import find_targets, fuse_shared_inputs

    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    uni = air_ft.compress(copy.deepcopy(base), tokenizer, [text], method="svdllm", retention=0.5, sequential=False,
                          **KW)
    model = copy.deepcopy(base)
    info = air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, sequential=False,
                           rank_allocation="global", **KW)
    assert info.extra["uniform_ranks"] == uni.ranks
    assert len(set(info.ranks.values())) > len(set(uni.ranks.values()))  # heterogeneous
    assert info.linear_params_after <= uni.linear_params_after
    for name, k in info.ranks.items():
        assert -(-uni.ranks[name] // 2) <= k <= 2 * uni.ranks[name], name
    ref = copy.deepcopy(base)
    cfg = CompressConfig(method="svdllm", rank_allocation="global", sequential=False, **KW)
    stats = get_stats(ref, tokenizer, [text], find_targets(ref), cfg, influence=True)
    given = air_ft.compress(ref, tokenizer, method="svdllm", retention=0.5, stats=stats, rank_allocation="global",
                            **KW)
    assert given.ranks == info.ranks
    ids = torch.arange(24).view(2, 12) % len(tokenizer)
    with torch.no_grad():
        logits = model(ids).logits
    path = save_compressed(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_compressed(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == info.ranks
    peft_model = apply_lora(loaded, "layer", rank=2, alpha=4.0)
    merged = merge_lora(peft_model)
    assert {n: m.rank for n, m in merged.named_modules() if isinstance(m, LowRankLinear)} == \
        {n: k + 2 for n, k in info.ranks.items()}
    with torch.no_grad():
        before = merged(ids).logits
        fuse_shared_inputs(merged, ids)
        torch.testing.assert_close(merged(ids).logits, before, atol=1e-5, rtol=1e-5)
    export_dense(model, tokenizer, tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, logits, atol=1e-4, rtol=1e-4)


def test_the_default_is_air_with_every_lever_that_won_and_it_reloads(model, tokenizer, text, tmp_path):
    """compress() with no method: AIR-2S, i.e. AIR with the output side, global ranks, the sweep in two-sided
    coordinates and block refinement (sequential); its heterogeneous checkpoint reloads to the same logits."""
    from air_ft.checkpoint import load_compressed, save_compressed

    info = air_ft.compress(model, tokenizer, [text], retention=0.5, **KW)
    cfg = info.config
    assert (cfg["method"], cfg["output_weight"], cfg["rank_allocation"], cfg["als_output_side"], cfg["refine_steps"],
            cfg["sequential"]) == ("air2s", 0.5, "global", True, 16, True)
    assert info.extra["uniform_ranks"] and info.ranks != info.extra["uniform_ranks"]  # ranks moved between layers
    assert info.stream["refine"]["steps_per_block"] == 16 and info.stream["refine"]["tokens"] > 0
    assert info.objective and all(v[-1] <= v[0] for v in info.objective.values())  # the sweep never raised it
    ids = torch.arange(24).view(2, 12) % len(tokenizer)
    with torch.no_grad():
        logits = model(ids).logits
        loaded, _ = load_compressed(save_compressed(model, tokenizer, tmp_path / "ckpt"))
        assert torch.allclose(loaded(ids).logits, logits, atol=1e-5)


@pytest.mark.parametrize("sources", [1, 2, 3, 4, 5, 6, 8])
def test_delta_auto_holds_out_every_source_and_keeps_the_fit_windows_balanced(sources):
    """Calibration windows come from the sources in turn (window i from source i mod s): the held-out windows of
    delta: auto take every source in turn, so neither side is one source's alone (every 8th window was, for s = 2,
    4 and 8: the two-text recipes chose delta on the plays alone and calibrated on 32 britannica / 24 plays)."""
    from air_ft.compress import held_out_windows

    for n in (16, 32, 64, 128):
        held = held_out_windows(n)
        assert int(held.sum()) == n // 8
        source = torch.arange(n) % sources
        held_counts = torch.bincount(source[held], minlength=sources)
        fit_counts = torch.bincount(source[~held], minlength=sources)
        if n // 8 >= sources:
            assert (held_counts > 0).all(), (n, held_counts)
        assert int(held_counts.max() - held_counts.min()) <= 1, (n, held_counts)
        full = torch.bincount(source, minlength=sources)
        assert int(fit_counts.max() - fit_counts.min()) <= int(full.max() - full.min()) + 1, (n, fit_counts)
    assert held_out_windows(5).tolist() == [False] * 4 + [True]


def test_delta_auto_keeps_the_candidate_with_the_lowest_loss_on_held_out_calibration_windows(tokenizer, text):
    """Every candidate's loss on the held-out windows is what its compression from the fit windows gives (recomputed
    here by hand), the lowest wins, and the model is that candidate's compression."""
    from air_ft.data import sample_windows

    base = tiny_llama(vocab_size=len(tokenizer), layers=2)
    windows = sample_windows(tokenizer, [text], 16, 32, 0)
    opts = dict(method="air", retention=0.5, sequential=False, batch_size=4, progress=False)
    model = copy.deepcopy(base)
    info = air_ft.compress(model, tokenizer, windows=windows, delta="auto", delta_candidates=[0.0, 1.0, 16.0], **opts)
    auto = info.extra["delta_auto"]
    assert (auto["fit_windows"], auto["held_out_windows"]) == (14, 2)
    fit, held = windows[[i for i in range(16) if i not in (7, 14)]], windows[[7, 14]]
    by_hand = {}
    for d in (0.0, 1.0, 16.0):
        trial = copy.deepcopy(base)
        air_ft.compress(trial, tokenizer, windows=fit, delta=d, **opts)
        with torch.no_grad():
            by_hand[d] = float(trial(input_ids=held, labels=held).loss)
    assert auto["candidates"] == pytest.approx(by_hand, rel=1e-5)
    assert len({round(v, 6) for v in by_hand.values()}) == 3  # the candidates do differ
    assert auto["chosen"] == min(by_hand, key=by_hand.get) == info.config["delta"]
    same = copy.deepcopy(base)
    air_ft.compress(same, tokenizer, windows=fit, delta=auto["chosen"], **opts)
    for (n, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    with pytest.raises(RecipeError, match="pass texts or windows instead of stats"):
        air_ft.compress(copy.deepcopy(base), tokenizer, stats=object(), delta="auto", **opts)
