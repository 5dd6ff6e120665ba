"""ACIP-style baseline on a tiny LLaMA: the gate, the parametrization, the score map, materialization at any size,
save/load of a fit, and a killed mask phase that resumes."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import air_ft
from air_ft.acip import (
    AcipFit,
    MaskedLowRankLinear,
    acip_fit,
    gate,
    parametrize,
    select_entries,
    size_ratio,
    update_scores,
)
from air_ft.config import RecipeError
from air_ft.efficiency import parameter_counts

from .conftest import study_base, tiny_llama


def test_gate_is_binary_forward_and_passes_gradients_only_to_live_entries():
    mask = torch.tensor([0.02, -0.01, 0.5, 0.0], requires_grad=True)
    g = gate(mask, 0.02)
    assert torch.equal(g.detach(), torch.tensor([0.02, 0.0, 0.02, 0.0]))
    (g * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(mask.grad, torch.tensor([1.0, 0.0, 3.0, 0.0]))


def test_full_masks_reproduce_the_dense_model(tokenizer):
    dense = tiny_llama(vocab_size=len(tokenizer))
    model = tiny_llama(vocab_size=len(tokenizer))
    sigmas = parametrize(model, scale=0.02)
    assert len(sigmas) == 14 and all(isinstance(model.get_submodule(n), MaskedLowRankLinear) for n in sigmas)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_mostly_pruned_layer_multiplies_by_its_live_entries_only_with_the_same_values_and_gradients(
        monkeypatch):
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(12, 16, 12, bias=True)
    with torch.no_grad():
        layer.mask.copy_(torch.where(torch.rand(12) < 0.5, -0.01, 0.02))  # about half the entries dead
        layer.factor_u.bias.normal_()
    x = torch.randn(3, 5, 12)

    def run():
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach(), xi.grad, layer.mask.grad.clone(), layer.factor_u.weight.grad.clone()

    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda inp, w, b=None: calls.append(w.shape) or linear(inp, w, b))
    compact = run()
    k = int((layer.mask > 0).sum())
    assert 0 < k < 9 and calls == [(k, 12), (16, k)]  # only the live rank was multiplied
    monkeypatch.setattr(MaskedLowRankLinear, "COMPACT_BELOW", 0.0)  # the full-rank reference
    full = run()
    for a, b in zip(compact, full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.equal(compact[2][layer.mask <= 0], torch.zeros(int((layer.mask <= 0).sum())))


def test_score_map_orders_entries_by_pruning_time():
    scores = torch.tensor([0.02, 0.02, 0.02])
    last = scores.clone()
    update_scores(scores, torch.tensor([-0.001, 0.03, 0.01]), last)  # entry 0 dies at step 1
    update_scores(scores, torch.tensor([-0.002, 0.03, -0.001]), last)  # entry 2 dies at step 2
    update_scores(scores, torch.tensor([-0.003, 0.04, -0.002]), last)
    assert scores[1] == pytest.approx(0.04) and scores[2] == -2 and scores[0] == -3  # earlier death: lower
    assert last.tolist() == pytest.approx([0.02, 0.04, 0.01])


def test_select_entries_hits_any_target_within_one_percent_and_breaks_ties():
    torch.manual_seed(0)
    shapes = {"a": (640, 320), "b": (480, 480), "c": (960, 160)}
    # many entries share a score (died at the same step): ties must be broken to hit the target
    scores = {n: -torch.randint(1, 4, (min(m, k),)).float() for n, (m, k) in shapes.items()}
    last = {n: torch.rand(s.numel()) for n, s in scores.items()}
    sigmas = {n: torch.rand(s.numel()) for n, s in scores.items()}
    for target in (0.2, 0.33, 0.5, 0.61, 0.8):
        kept = select_entries(scores, last, sigmas, shapes, target)
        got = size_ratio({n: int(k.sum()) for n, k in kept.items()}, shapes)
        assert target <= got <= target + 0.01, (target, got)
    kept = select_entries(scores, last, sigmas, shapes, 0.3)
    # the kept set is a prefix of the order: nothing kept scores below anything dropped
    kept_min = min(float(scores[n][kept[n]].min()) for n in shapes if kept[n].any())
    dropped_max = max(float(scores[n][~kept[n]].max()) for n in shapes if (~kept[n]).any())
    assert kept_min >= dropped_max


@pytest.fixture(scope="module")
def fit(tokenizer, text, tmp_path_factory):
    model = tiny_llama(vocab_size=len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = acip_fit(model, tokenizer, [text], max_steps=40, stop_retention=0.45, lambda_init=1e-3,
                      lambda_growth=1.3, lambda_every=1, mask_lr=2e-3, lora_lr=1e-3, lora_rank=2, post_tune_steps=2,
                      seq_len=32, batch_size=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model left unchanged
    return model, result


def test_the_mask_phase_shrinks_the_model_and_stops_at_the_stop_ratio(fit):
    _, result = fit
    ratios = [h["ratio"] for h in result.history]
    assert ratios[0] <= 1.0 and result.retention_reached <= 0.45 and ratios[-1] == result.retention_reached
    assert len(ratios) < 40  # stopped early
    assert result.tokens == (len(ratios) + 2) * 2 * 32


def test_the_stop_rule_counts_the_merged_lora_as_materialize_does(fit):
    """One size unit: the ratio the mask phase stops at is the materialized model's, LoRA included."""
    _, result = fit
    small = result.materialize(result.retention_reached)
    assert parameter_counts(small)["retention"] == pytest.approx(result.retention_reached, abs=0.01)
    live = {n: int((s > 0).sum()) for n, s in result.scores.items()}
    assert size_ratio(live, result.shapes, result.lora_rank) == pytest.approx(result.retention_reached)
    assert size_ratio(live, result.shapes) < result.retention_reached  # without LoRA it would stop later
    assert 0 < result.lora_share(small) < 1


class _Spy:
    """Records every Trainer ACIP builds (mask phase, post-tune) and every gradient norm clip it asks for."""

    def __init__(self, monkeypatch):
        import air_ft.train as train

        self.trainers, real = [], train.build_trainer

        def build(*args, **kwargs):
            trainer = real(*args, **kwargs)
            self.trainers.append(trainer)
            return trainer

        monkeypatch.setattr(train, "build_trainer", build)


ACIP_QUICK = dict(stop_retention=0.45, lambda_init=1e-3, lambda_growth=1.3, lambda_every=1, mask_lr=2e-3,
                  lora_lr=1e-3, lora_rank=2, post_tune_steps=3, seq_len=32, batch_size=2, progress=False)


def test_the_mask_phase_shows_its_progress_toward_the_stop_ratio(tokenizer, text, capsys):
    """The bar runs from the full size to the stop ratio (the Trainer's own would count to the 50,000-step cap)."""
    fit = acip_fit(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], **{**ACIP_QUICK, "progress": True})
    err = capsys.readouterr().err
    assert "ACIP mask phase" in err and "/50000" not in err
    assert f"step {len(fit.history)}, size ratio {fit.retention_reached:.3f} -> 0.45" in err and "100%" in err


def test_the_mask_phase_matches_the_reference_trainer(tokenizer, text, monkeypatch):
    """No gradient clipping; no step cap unless set; the post-tune continues the optimizer on unseen blocks."""
    spy = _Spy(monkeypatch)
    fit = acip_fit(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], **ACIP_QUICK)
    mask, post = spy.trainers
    assert mask.args.max_grad_norm in (0.0, None) and post.args.max_grad_norm in (0.0, None)
    assert mask.args.max_steps >= 50_000  # unset: until the stop ratio, as the reference
    adamw = post.optimizer.optimizer  # accelerate wraps it
    assert adamw is mask.optimizer.optimizer  # the same AdamW, its state carried on
    lora = next(p for n, p in post.model.named_parameters() if "lora_A" in n)
    assert int(adamw.state[lora]["step"]) == len(fit.history) + 3
    seen = {tuple(row) for row in mask.train_dataset["input_ids"]}
    tuned = {tuple(row) for row in post.train_dataset["input_ids"]}
    assert tuned and not seen & tuned  # disjoint data


def test_a_bound_the_user_sets_ends_the_phase_with_a_clear_error(tokenizer, text):
    with pytest.raises(RecipeError, match="raise acip.max_steps"):
        acip_fit(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], max_steps=2,
                 **{**ACIP_QUICK, "stop_retention": 0.2})


def test_materialize_hits_the_target_and_equals_the_masked_model(fit, tokenizer):
    _, result = fit
    small = result.materialize(0.6)
    info = parameter_counts(small)
    assert 0.6 <= info["retention"] <= 0.61  # LoRA merged and counted
    # the masked model with the same entries kept: its LoRA output equals the materialized model's
    from air_ft.acip import _lora_parts

    parts = _lora_parts(result.model)
    lora_rank = {n: b.shape[1] for n, (_, b, _, _) in parts.items()}
    kept = select_entries(result.scores, result.last_positive, result.sigmas, result.shapes, 0.6, lora_rank)
    saved = {n: layer.mask.detach().clone() for n, (layer, _, _, _) in parts.items()}
    for n, (layer, _, _, _) in parts.items():
        layer.mask.data = torch.where(kept[n], torch.full_like(saved[n], 0.02), torch.full_like(saved[n], -1.0))
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        masked = result.model(input_ids=ids).logits
        torch.testing.assert_close(small(input_ids=ids).logits, masked, atol=1e-4, rtol=1e-4)
    for n, (layer, _, _, _) in parts.items():
        layer.mask.data = saved[n]
    with pytest.raises(RecipeError, match="below what the mask phase reached"):
        result.materialize(result.retention_reached - 0.05)


def test_materialized_factors_are_balanced_like_the_compressed_models(fit):
    """``U`` and ``V`` carry the same share of each singular value (``U^T U = V V^T`` diagonal), as
    :func:`air_ft.compress` makes them, not ACIP's ``U sqrt(s)`` and ``Sigma V^T / sqrt(s)``: a LoRA on the factors
    then takes steps of the same size on both sides."""
    _, result = fit
    small = result.materialize(0.6)
    layers = [m for m in small.modules() if isinstance(m, air_ft.LowRankLinear)]
    assert layers
    for layer in layers:
        u, v = layer.factor_u.weight.double(), layer.factor_v.weight.double()
        gram_u, gram_v = u.T @ u, v @ v.T
        torch.testing.assert_close(gram_u, gram_v, atol=1e-4 * gram_u.diagonal().max().item(), rtol=1e-4)
        torch.testing.assert_close(gram_u, torch.diag(gram_u.diagonal()), atol=1e-4 * gram_u.diagonal().max().item(),
                                   rtol=0)


def test_a_fit_saves_and_loads_and_materializes_the_same(fit, tmp_path, tokenizer):
    _, result = fit
    result.save(tmp_path / "fit")
    again = AcipFit.load(tmp_path / "fit")
    assert again.retention_reached == result.retention_reached and again.settings == result.settings
    ids = torch.randint(0, len(tokenizer), (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again.materialize(0.7)(input_ids=ids).logits,
                                   result.materialize(0.7)(input_ids=ids).logits)
    small = again.materialize(0.7)
    air_ft.save_compressed(small, tokenizer, tmp_path / "ckpt")  # the project's factored format
    loaded, _ = air_ft.load_compressed(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, small(input_ids=ids).logits)


class _Kill(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_a_killed_mask_phase_resumes_with_its_score_map(tokenizer, text, tmp_path):
    kwargs = dict(stop_retention=0.93, lambda_init=1e-3, lambda_growth=1.3, lambda_every=1,
                  mask_lr=2e-3, lora_lr=1e-3, lora_rank=2, post_tune_steps=0, seq_len=32, batch_size=2,
                  progress=False)
    straight = acip_fit(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], **kwargs)
    assert len(straight.history) > 7  # long enough to be killed at step 7
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        acip_fit(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], output_dir=out, callbacks=[_Kill(7)],
                 save_steps=5, **kwargs)
    assert (out / "mask_phase" / "checkpoint-5" / "acip_scores.safetensors").exists()
    resumed = acip_fit(tiny_llama(vocab_size=len(tokenizer)), tokenizer, [text], output_dir=out, save_steps=5,
                       **kwargs)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    assert resumed.history[-1]["ratio"] == pytest.approx(straight.history[-1]["ratio"])


def _write_acip_study(tmp_path, tokenizer, text, study: dict, **sections) -> None:
    """A tiny saved model, a corpus and ``tmp_path/study.yaml``: SVD-LLM(W) and a quick ACIP-style schedule."""
    import yaml

    recipe = {**study_base(tmp_path, tiny_llama(vocab_size=len(tokenizer)), tokenizer, text),
              "compress": {"num_samples": 8, "seq_len": 32, "progress": False},
              "eval": {"seq_len": 32, "max_windows": 4, "efficiency": False},
              "acip": {"max_steps": 40, "stop_retention": 0.45, "lambda_init": 1e-3, "lambda_growth": 1.3,
                       "lambda_every": 1, "mask_lr": 2e-3, "lora_lr": 1e-3, "lora_rank": 2, "post_tune_steps": 2,
                       "seq_len": 32, "batch_size": 2},
              "study": {"methods": ["svdllm", "acip"], "dense": False, **study}, **sections}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(recipe))


def test_acip_is_one_more_method_of_the_study(tmp_path, tokenizer, text):
    import json

    from air_ft.config import load_recipe
    from air_ft.pipeline import run_study

    _write_acip_study(tmp_path, tokenizer, text, study={"retentions": [0.7, 0.5]})
    with pytest.raises(RecipeError, match="acip.stop_retention"):
        run_study(load_recipe(str(tmp_path / "study.yaml"), ["study.retentions=[0.3]"]))
    report = run_study(load_recipe(str(tmp_path / "study.yaml")))
    acip_rows = [r for r in report["rows"] if r["method"] == "acip"]
    assert [r["retention"] for r in acip_rows] == [0.7, 0.5]
    for r in acip_rows:
        assert r["retention"] <= r["compress"]["retention_actual"] <= r["retention"] + 0.01
        assert r["tokens"]["training"] == r["compress"]["train_tokens"] > 0
    fits = list((tmp_path / "cache" / "acip").iterdir())  # one mask phase served both retentions
    assert len(fits) == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| ACIP-style |" in md and "train tokens" in md
    assert all(0 < r["compress"]["lora_share"] < 1 for r in acip_rows) and "merged LoRA's share" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["recipe"]["acip"]["lora_rank"] == 2


def test_acip_lora_row_spends_the_same_total_tokens_as_the_others(tmp_path, tokenizer, text):
    """study.equal_tokens: ACIP's mask phase and post-tune come off its LoRA steps, so its +LoRA row trains on as
    many tokens in all as SVD-LLM(W)'s; a budget the post-tune alone exhausts is refused before any work."""

    from air_ft.config import load_recipe
    from air_ft.pipeline import run_study
    from air_ft.pipeline.plan import lora_budget

    _write_acip_study(tmp_path, tokenizer, text, study={"retentions": [0.5], "lora": True}, lora={"rank": 2},
                      train={"max_steps": 30, "batch_size": 2, "seq_len": 32, "eval_steps": 0, "save_steps": 0,
                             "distill": 0.0})
    with pytest.raises(RecipeError, match="post-tune alone"):
        run_study(load_recipe(str(tmp_path / "study.yaml"), ["acip.post_tune_steps=29"]))
    assert not (tmp_path / "out" / "stages").exists()
    report = run_study(load_recipe(str(tmp_path / "study.yaml")))
    rows = {r["name"]: r for r in report["rows"]}
    spent = rows["acip-r0.50"]["tokens"]["training"]
    assert 0 < spent < 30 * 64 and spent % 64 == 0
    assert rows["acip-r0.50+lora"]["train"]["tokens"] == 30 * 64 - spent
    assert rows["acip-r0.50+lora"]["tokens"]["training"] == rows["svdllm-r0.50+lora"]["tokens"]["training"] == 30 * 64
    md = (tmp_path / "out" / "report.md").read_text()
    assert "fewer LoRA steps" in md and md.count("| 1,920 |") == 2  # each +LoRA row's total training tokens
    # off: every method trains train.max_steps on top of its own; a mask phase that ate the budget is refused
    rec = load_recipe(str(tmp_path / "study.yaml"), ["study.equal_tokens=false"])
    assert lora_budget(rec, spent, "acip-r0.50").max_steps == 30
    rec = load_recipe(str(tmp_path / "study.yaml"))
    with pytest.raises(RecipeError, match="whole LoRA budget"):
        lora_budget(rec, 30 * 64, "acip-r0.50")
