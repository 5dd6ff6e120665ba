"""Calibration: Grams equal X^T X, shared inputs share one Gram, influence equals per-sample autograd, hooks go."""

from __future__ import annotations

import pytest
import torch

from air_ft.calibration import CalibrationError, calibrate, load_stats, save_stats
from air_ft.data import sample_windows
from air_ft.modeling import find_targets


def _inputs_by_hand(model, windows):
    """Record every target layer's input with separate hooks, for an independent X^T X."""
    seen, handles = {}, []
    for name, mod in find_targets(model).items():
        handles.append(mod.register_forward_hook(
            lambda m, i, o, name=name: seen.setdefault(name, []).append(i[0].detach().reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


def test_gram_equals_xtx_and_shared_inputs_share_one_gram(model, tokenizer, text):
    windows = sample_windows(tokenizer, [text], 6, 32, seed=0)
    targets = find_targets(model)
    stats = calibrate(model, windows, targets, influence=False, batch_size=4, progress=False)
    xs = _inputs_by_hand(model, windows)
    for name in targets:
        gram = stats.gram(name)
        assert torch.allclose(gram, xs[name].T @ xs[name], rtol=1e-10, atol=1e-8), name
        assert torch.allclose(stats.abs_sum[stats.group_of[name]], xs[name].abs().sum(0), rtol=1e-10)
    layer = "model.layers.0"
    assert stats.group_of[f"{layer}.self_attn.k_proj"] == stats.group_of[f"{layer}.self_attn.v_proj"] == \
        f"{layer}.self_attn.q_proj"
    assert stats.group_of[f"{layer}.mlp.up_proj"] == f"{layer}.mlp.gate_proj"
    assert stats.group_of[f"{layer}.self_attn.o_proj"] == f"{layer}.self_attn.o_proj"
    assert stats.group_of["model.layers.1.self_attn.q_proj"] == "model.layers.1.self_attn.q_proj"
    assert len(stats.grams) == 4 * 2
    assert stats.tokens == 6 * 32


def test_influence_equals_per_sample_autograd(model, tokenizer, text):
    windows = sample_windows(tokenizer, [text], 3, 24, seed=1)
    targets = find_targets(model)
    stats = calibrate(model, windows, targets, influence=True, batch_size=2, progress=False)
    wxg = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    fisher = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    for d in range(windows.shape[0]):  # one sample per backward: |.| taken per sample, as the method says
        model.zero_grad()
        model(input_ids=windows[d:d + 1], labels=windows[d:d + 1]).loss.backward()
        for n, m in targets.items():
            wxg[n] += (m.weight * m.weight.grad).abs()
            fisher[n] += m.weight.grad.square()
    for n in targets:
        assert torch.allclose(stats.influence["wxg"][n], wxg[n], rtol=1e-4, atol=1e-9), n
        assert torch.allclose(stats.influence["fisher"][n], fisher[n], rtol=1e-4, atol=1e-12), n
    # the absolute value per sample matters: it differs from |W * sum_d g_d|
    model.zero_grad()
    (model(input_ids=windows, labels=windows).loss * windows.shape[0]).backward()
    name = "model.layers.0.mlp.down_proj"
    summed = (targets[name].weight * targets[name].weight.grad).abs()
    assert not torch.allclose(summed, stats.influence["wxg"][name], rtol=1e-3)


def test_output_gram_equals_the_sum_of_the_token_output_gradients_outer_products(model, tokenizer, text):
    """ograd = sum_t dL/dy_t (dL/dy_t)^T over every calibration token, from either backward pass."""
    from air_ft.linalg import whitening_factor

    windows = sample_windows(tokenizer, [text], 3, 24, seed=1)
    targets = find_targets(model)
    grads, handles = {}, []

    def keep(name):
        def hook(mod, inputs, output):  # independent hooks: keep every output's gradient
            output.register_hook(lambda g: grads.setdefault(name, []).append(g.reshape(-1, g.shape[-1]).double()))
        return hook

    for name, mod in targets.items():
        handles.append(mod.register_forward_hook(keep(name)))
    for p in model.parameters():
        p.requires_grad_(True)
    (model(input_ids=windows, labels=windows).loss * windows.shape[0]).backward()
    for h in handles:
        h.remove()
    stats = calibrate(model, windows, targets, influence=True, batch_size=2, progress=False)
    first = calibrate(model, windows, targets, influence=False, batch_size=2, progress=False)
    whitening = {n: whitening_factor(first.gram(n))[0] for n in targets}
    again = calibrate(model, windows, targets, influence=False, batch_size=2, progress=False, whitening=whitening)
    alone = calibrate(model, windows, targets, influence=True, batch_size=2, progress=False, maps=False)
    assert set(alone.influence) == {"ograd"}  # the backward of global rank allocation measures nothing else
    for name in targets:
        g = torch.cat(grads[name])
        expected = g.T @ g
        assert expected.shape == (targets[name].out_features,) * 2
        for got in (stats.influence["ograd"][name], again.influence["ograd"][name], alone.influence["ograd"][name]):
            assert got.dtype == torch.float64
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), name
    assert "ograd" not in first.influence


def test_whitened_fisher_is_the_fisher_of_the_whitened_weight(model, tokenizer, text):
    """fisher_whitened = sum_d (g_d S^-T)^2: the per-sample gradient with respect to W' = W S."""
    from air_ft.linalg import whitening_factor

    windows = sample_windows(tokenizer, [text], 3, 24, seed=1)
    targets = find_targets(model)
    first = calibrate(model, windows, targets, influence=False, batch_size=2, progress=False)
    factors = {g: whitening_factor(first.grams[g])[0] for g in set(first.group_of.values())}
    whitening = {n: factors[first.group_of[n]] for n in targets}
    stats = calibrate(model, windows, targets, influence=False, batch_size=2, progress=False, whitening=whitening)
    assert set(stats.influence) == {"fisher_whitened", "ograd"}
    expected = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in targets.items()}
    for d in range(windows.shape[0]):
        model.zero_grad()
        model(input_ids=windows[d:d + 1], labels=windows[d:d + 1]).loss.backward()
        for n, m in targets.items():
            s = whitening[n]
            g_white = torch.linalg.solve_triangular(s.T, m.weight.grad.double(), upper=True, left=False)  # g S^-T
            expected[n] += g_white.square()
    for n in targets:  # float32 hooks vs a float64 reference through S^-1 (some Grams here are near-singular)
        got = stats.influence["fisher_whitened"][n].double()
        assert (got - expected[n]).abs().max() <= 1e-3 * expected[n].max(), n
    # a different signal from the plain Fisher
    name = "model.layers.0.self_attn.q_proj"
    plain = calibrate(model, windows, targets, influence=True, batch_size=2, progress=False).influence["fisher"][name]
    assert not torch.allclose(plain.double() / plain.mean(), expected[name] / expected[name].mean(), rtol=0.1)


def test_hooks_removed_and_model_state_restored(model, tokenizer, text):
    windows = sample_windows(tokenizer, [text], 2, 16, seed=0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibrate(model, windows, find_targets(model), influence=True, batch_size=2, progress=False)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._backward_hooks
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_nan_in_activations_is_rejected_with_advice(model, tokenizer, text):
    windows = sample_windows(tokenizer, [text], 2, 16, seed=0)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or Inf.*float32"):
        calibrate(model, windows, find_targets(model), influence=False, progress=False)
    for mod in model.modules():  # hooks are gone even after the failure
        assert not mod._forward_hooks


def test_stats_round_trip_through_disk(model, tokenizer, text, tmp_path):
    windows = sample_windows(tokenizer, [text], 2, 16, seed=0)
    stats = calibrate(model, windows, find_targets(model), influence=True, batch_size=2, progress=False)
    save_stats(stats, tmp_path / "s")
    back = load_stats(tmp_path / "s")
    assert back.cached and back.group_of == stats.group_of and back.tokens == stats.tokens
    for k in stats.grams:
        assert torch.equal(back.grams[k], stats.grams[k])
    for sig in ("wxg", "fisher"):
        for k in stats.influence[sig]:
            assert torch.equal(back.influence[sig][k], stats.influence[sig][k])
    assert load_stats(tmp_path / "missing") is None
