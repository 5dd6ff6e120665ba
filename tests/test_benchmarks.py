"""The benchmark scripts refuse nonsense options at parse time, with a message naming the option, before loading
anything (each case runs the script in a subprocess; a refusal exits with argparse's status 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,args,message", [
    ("gpu_train.py", ["--steps", "0"], "--steps must be an integer >= 1"),
    ("gpu_train.py", ["--warmup", "-1"], "--warmup must be an integer >= 0"),
    ("gpu_train.py", ["--retention", "1.2"], "--retention must lie strictly between 0 and 1"),
    ("task_choice.py", ["--limit", "0"], "--limit must be >= 1"),
    ("task_choice.py", ["--tasks", "piqaa"], "unknown lm-eval task(s) ['piqaa']"),
    ("recovery.py", ["--variants", "nope"], "--variants ['nope'] not in the recipe's"),
    ("recovery.py", ["--retentions", "1"], "--retentions must lie strictly between 0 and 1"),
    ("efficiency.py", ["--retentions", "1.5"], "--retentions must lie strictly between 0 and 1"),
    ("efficiency.py", ["--repeats", "0"], "must be >= 1"),
    ("user_loaded.py", ["--steps", "0"], "--steps and --eval-windows must be >= 1"),
    ("lm_eval_agreement.py", ["--limit", "0"], "--limit must be >= 1"),
    ("scale.py", ["--retention", "1"], "--retention must lie strictly between 0 and 1"),
    ("scale.py", ["--num-samples", "0"], "--num-samples must be >= 1"),
    ("sequential.py", ["--retentions", "0"], "--retentions must lie strictly between 0 and 1"),
    ("levers.py", ["--retentions", "1"], "--retentions must lie strictly between 0 and 1"),
    ("levers.py", ["--variants", "nope"], "--variants ['nope'] not in the recipe's"),
    ("levers.py", ["--methods", "nope"], "--methods ['nope'] not in the recipe's"),
    ("data_efficiency.py", ["--variants", "n7"], "--variants ['n7'] not in the recipe's"),
    ("data_efficiency.py", ["--retentions", "0"], "--retentions must lie strictly between 0 and 1"),
    ("compress_time.py", ["--retention", "1"], "--retentions must lie strictly between 0 and 1"),
    ("compress_time.py", ["--num-samples", "0"], "--num-samples must be >= 1"),
    ("acip_schedule.py", ["--variants", "nope"], "--variants ['nope'] not in the recipe's"),
    ("acip_schedule.py", ["--retentions", "0.3"], "--retentions must be >= the recipe's acip.stop_retention"),
    ("acip_schedule.py", ["--retentions", "1"], "--retentions must lie strictly between 0 and 1"),
    ("acip_budget.py", ["--multipliers", "0"], "--multipliers must be integers >= 1"),
    ("acip_budget.py", ["--schedule", "lambda_every=2"], "use key=value"),
    ("acip_budget.py", ["--retention", "0.5"], "--retention must lie in [stop-retention"),
    ("acip_budget.py", ["--post-tune-steps", "48"], "below half of --base-steps"),
    ("acip_budget.py", ["--methods", "svdllm"], "invalid choice"),
    ("peak_memory.py", ["--repeats", "0"], "--tokens and --repeats must be >= 1"),
    ("refine_probe.py", ["--recipe", "r.yaml", "--checkpoint", ".", "--rates", "adam:1e-3"], "write SCALE:LR"),
    ("refine_probe.py", ["--recipe", "r.yaml", "--checkpoint", ".", "--rates", "rms:fast"], "LR must be a number"),
    ("refine_probe.py", ["--recipe", "r.yaml", "--checkpoint", "."], "is not a factored checkpoint"),
    ("acip_claims.py", ["--study", "no/such/study"], "give --study a finished study's directory"),
    ("peak_memory.py", ["--rank-maps", "no/such.json"], "--rank-maps: no such file no/such.json"),
    ("peak_memory.py", ["--rank-maps", str(Path(__file__))], "cannot be read as JSON"),
])
def test_bad_benchmark_options_are_refused_before_any_work(script, args, message):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_efficiency_benchmark_runs_on_a_tiny_shape(tmp_path):
    import json

    out = tmp_path / "eff.json"
    args = ["--shape", "tiny", "--threads", "1", "--repeats", "1", "--rounds", "1", "--retentions", "0.5",
            "--batch-sizes", "1", "2", "--prompt-len", "8", "--prefill-len", "16", "--decode-steps", "2",
            "--output", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH / "efficiency.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"dense", "factored r0.50", "fused r0.50"}
    assert rows["factored r0.50"]["vs_dense"]["params"] < 1 and rows["dense"]["vs_dense"]["decode_latency_b2"] == 1
    assert rows["fused r0.50"]["params"] == rows["factored r0.50"]["params"]


def test_efficiency_benchmark_measures_the_ranks_of_a_stage_marker(tmp_path):
    """--rank-maps: uneven per-layer ranks read from a compress stage marker; the layers it names are factored at
    exactly those ranks, the others stay dense (the linear count below is worked out by hand for the tiny shape)."""
    import json

    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 4,
             "model.layers.0.mlp.gate_proj": 20, "model.layers.1.mlp.up_proj": None}
    (tmp_path / "acip-r0.80").mkdir()
    (tmp_path / "acip-r0.80" / "stage.json").write_text(json.dumps({"result": {"info": {"ranks": ranks}}}))
    (tmp_path / "empty.json").write_text("{}")
    out = tmp_path / "eff.json"
    args = ["--shape", "tiny", "--threads", "1", "--repeats", "1", "--rounds", "1", "--batch-sizes", "1",
            "--prompt-len", "8", "--prefill-len", "16", "--decode-steps", "2", "--output", str(out), "--rank-maps"]
    run = [sys.executable, str(BENCH / "efficiency.py"), *args]
    proc = subprocess.run(run + [str(tmp_path / "acip-r0.80" / "stage.json")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"dense", "acip-r0.80", "acip-r0.80 fused"}
    # 2 blocks of q 64x64, k and v 32x64, o 64x64, gate and up 160x64, down 64x160 = 86,016; three layers factored
    assert rows["dense"]["params"]["linear"] == 86016
    assert rows["acip-r0.80"]["params"]["linear"] == 86016 - (4096 + 2048 + 10240) + (8 * 128 + 4 * 96 + 20 * 224)
    assert rows["acip-r0.80"]["params"]["factored_layers"] == 3
    proc = subprocess.run(run + [str(tmp_path / "empty.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--rank-maps: " in proc.stderr and "holds no ranks map" in proc.stderr
    proc = subprocess.run(run + [str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot be read as JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_scale_benchmark_runs_on_a_tiny_shape(tmp_path):
    """benchmarks/scale.py end to end on a tiny Llama on the CPU, so the 7B script cannot rot."""
    import json

    out = tmp_path / "scale.json"
    args = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--num-samples", "4", "--seq-len", "32",
            "--repeats", "1", "--output", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH / "scale.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {r["backend"] for r in res["als"]} == {"native", "torch"}
    assert all(r["effective_bytes_per_s"] > 0 and r["objective_end"] <= r["objective_start"] for r in res["als"])
    comp = res["compress"]
    assert comp["stream"]["blocks"] == 2 and comp["tokens"] == 4 * 32 and 0.5 < comp["retention_actual"] <= 0.6
    assert set(res["ratios_to_dense"]) == {"factored", "fused"}
    assert res["fused"]["params"] == res["factored"]["params"] and res["factored"]["params"]["retention"] < 0.61


def test_acip_budget_curve_gives_every_point_equal_budgets(monkeypatch):
    """benchmarks/acip_budget.py: at multiplier k both methods get k times the LoRA steps; ACIP's schedule scales
    as a whole (masks' lr k times lower, lambda growing k times slower, the phase running to its stop) and its
    post-tune is k times longer; the own-stop rows stop at the retention itself; every recipe passes the checks."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    import acip_budget

    from air_ft.config import load_recipe
    from air_ft.pipeline import check_study

    args = argparse.Namespace(retention=0.6, stop_retention=0.55, base_steps=64, post_tune_steps=4, seq_len=512,
                              batch_size=2, tasks=["piqa"], device="cpu", methods=["air", "acip"])
    schedule = acip_budget.recipe_schedule(str(BENCH.parent / "recipes" / "smollm2-135m" / "study.yaml"), "")
    for k in (1, 4, 16):
        recipe = load_recipe(str(BENCH.parent / "recipes" / "smollm2-135m" / "study.yaml"),
                             acip_budget.overrides(args, k, schedule))
        check_study(recipe)
        assert recipe.train.max_steps == 64 * k and recipe.acip.post_tune_steps == 4 * k
        assert recipe.acip.lambda_growth ** k == pytest.approx(schedule["lambda_growth"]) == 1.08
        assert recipe.acip.mask_lr * k == pytest.approx(schedule["mask_lr"]) and recipe.acip.max_steps is None
        assert recipe.acip.lora_lr == schedule["lora_lr"]  # LoRA's own step is not ACIP's schedule
        assert recipe.study.methods == ["air", "acip"] and recipe.study.equal_tokens and recipe.eval.tasks == ["piqa"]
        assert recipe.output_dir.endswith(f"acip_budget_smollm2/x{k}")
        own = load_recipe(str(BENCH.parent / "recipes" / "smollm2-135m" / "study.yaml"),
                          acip_budget.overrides(args, k, schedule, own_stop=True))
        check_study(own)
        assert own.acip.stop_retention == 0.6 and own.study.methods == ["acip"]
        assert own.output_dir.endswith(f"acip_budget_smollm2/x{k}-own-stop")
    args.methods = ["acip"]  # one half of the point, for a second process beside the first
    assert load_recipe(str(BENCH.parent / "recipes" / "smollm2-135m" / "study.yaml"),
                       acip_budget.overrides(args, 4, schedule)).study.methods == ["acip"]


def test_recovery_table_sets_each_placement_against_its_own_compression_and_svdllm(monkeypatch):
    """benchmarks/recovery.py: both placements of a method share its compressed row (a placement does not change the
    compression); the gap closed is (before - after) / (before - dense) per text; AIR + LoRA is divided by SVD-LLM(W)
    + LoRA of the same retention and placement, never the other placement's."""
    monkeypatch.syspath_prepend(str(BENCH))
    import recovery

    texts = ("val_britannica", "val_plays", "britannica", "plays")

    def row(name, method, lora, variant, value):
        r = {"name": name, "method": method, "retention": 0.6, "lora": lora, "variant": variant,
             "perplexity": {t: {"ppl": value + i} for i, t in enumerate(texts)}}
        return {**r, "train": {"tokens": 65536, "seconds": 10.0}} if lora else r

    recipe = {"study": {"variants": {"factors": {}, "layer": {"lora": {"placement": "layer"}}}},
              "lora": {"placement": "factors"}}
    report = {"recipe": recipe, "rows": [row("dense", "dense", False, None, 10.0),
                       row("svdllm-r0.60-factors", "svdllm", False, "factors", 110.0),
                       row("svdllm-r0.60-factors+lora", "svdllm", True, "factors", 60.0),
                       row("svdllm-r0.60-layer+lora", "svdllm", True, "layer", 40.0),
                       row("air-r0.60-factors", "air", False, "factors", 70.0),
                       row("air-r0.60-factors+lora", "air", True, "factors", 30.0),
                       row("air-r0.60-layer+lora", "air", True, "layer", 20.0)]}
    rows = {(r["method"], r["placement"]): r for r in recovery.recovery_table(report)["rows"]}
    assert set(rows) == {("svdllm", "factors"), ("svdllm", "layer"), ("air", "factors"), ("air", "layer")}
    air_layer = rows["air", "layer"]
    assert air_layer["before"]["britannica"] == 72.0 and air_layer["after"]["britannica"] == 22.0
    assert air_layer["gap_closed"]["britannica"] == pytest.approx((72 - 22) / (72 - 12))
    assert rows["svdllm", "layer"]["gap_closed"]["plays"] == pytest.approx((113 - 43) / (113 - 13))
    assert air_layer["ratio_to_svdllm_lora"]["plays"] == pytest.approx(23 / 43)
    assert rows["air", "factors"]["ratio_to_svdllm_lora"]["plays"] == pytest.approx(33 / 63)
    assert rows["svdllm", "factors"]["ratio_to_svdllm_lora"]["britannica"] == 1.0
    assert rows["air", "layer"]["model"] == "air"  # a placement is not a new model

    # variants that are compressions (recipes/qwen2.5-coder-0.5b/recovery.yaml): each + LoRA row reads its own
    # compressed row and is set against SVD-LLM(W)'s at the same placement
    recipe = {"study": {"variants": {"input": {"output_weight": 0.0, "methods": ["svdllm"]},
                                     "combined-2s": {"output_weight": 0.5, "methods": ["air"]}}},
              "lora": {"placement": "factors"}}
    report = {"recipe": recipe, "rows": [row("dense", "dense", False, None, 10.0),
                                         row("svdllm-r0.60-input", "svdllm", False, "input", 110.0),
                                         row("svdllm-r0.60-input+lora", "svdllm", True, "input", 60.0),
                                         row("air-r0.60-combined-2s", "air", False, "combined-2s", 50.0),
                                         row("air-r0.60-combined-2s+lora", "air", True, "combined-2s", 30.0)]}
    rows = {r["model"]: r for r in recovery.recovery_table(report)["rows"]}
    assert set(rows) == {"svdllm (input)", "air (combined-2s)"}
    default = rows["air (combined-2s)"]
    assert default["placement"] == "factors" and default["before"]["plays"] == 53.0
    assert default["ratio_to_svdllm_lora"]["plays"] == pytest.approx(33 / 63)


def test_a_task_qualifies_only_well_and_clearly_above_chance(monkeypatch):
    """benchmarks/task_choice.py: the headline metric (acc_norm where lm-eval has it), its margin over chance, and
    qualification at >= 10 points and more than two standard errors above chance."""
    monkeypatch.syspath_prepend(str(BENCH))
    import task_choice

    def res(acc, acc_norm, se, chance=0.25):
        return {"split": "validation", "n": 250, "chance": chance, "acc": acc, "acc_stderr": se,
                **({"acc_norm": acc_norm, "acc_norm_stderr": se} if acc_norm is not None else {})}

    clear = task_choice.qualification(res(0.30, 0.40, 0.03))
    assert clear["metric"] == "acc_norm" and clear["margin"] == pytest.approx(0.15) and clear["qualifies"]
    assert not task_choice.qualification(res(0.30, 0.40, 0.08))["qualifies"]  # 15 points, but under 2 SE
    assert not task_choice.qualification(res(0.60, 0.33, 0.01))["qualifies"]  # acc_norm is the one read: 8 points
    plain = task_choice.qualification(res(0.62, None, 0.02, chance=0.5))
    assert plain["metric"] == "acc" and plain["margin"] == pytest.approx(0.12) and plain["qualifies"]


def test_a_partial_task_choice_keeps_the_earlier_rows_of_the_same_protocol(monkeypatch, tmp_path):
    """benchmarks/task_choice.py: a run over some tasks replaces those rows in place and keeps the others an earlier
    run wrote with the same model, limit and seed; another model, limit or seed keeps nothing."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import task_choice

    monkeypatch.setattr(common, "RESULTS", tmp_path)

    def row(task, seed=1, tag="old"):
        return {"task": task, "tag": tag, "result": {"seed": seed}}

    (tmp_path / "tc.json").write_text(json.dumps({"model": "m", "limit": 250, "rows": [
        row("piqa"), row("boolq"), row("sciq", seed=0)]}))
    new = [row("boolq", tag="new"), row("copa", tag="new")]
    kept = task_choice.earlier_rows("tc.json", "m", 250, 1, new)
    assert [(r["task"], r["tag"]) for r in kept] == [("piqa", "old"), ("boolq", "new"), ("copa", "new")]
    assert task_choice.earlier_rows("tc.json", "m", 100, 1, new) == new
    assert task_choice.earlier_rows("tc.json", "other", 250, 1, new) == new
    assert task_choice.earlier_rows("missing.json", "m", 250, 1, new) == new


def test_acip_schedules_are_chosen_by_their_mean_over_seeds(monkeypatch):
    """benchmarks/acip_schedule.py: variants that differ only in acip.seed are one schedule; it is named by its
    lowest seed, scored per retention by the mean of its seeds' validation geo-means, and the best mean wins even
    where another schedule has the best single seed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import acip_schedule

    def entry(variant, seed, lr, val, held):
        return variant, {"variant": variant, "acip": {"mask_lr": lr, "seed": seed},
                         "retentions": {"0.60": {"validation_score": val, "evaluation": {"a": held, "b": held}}}}

    schedules = dict([entry("fast-seed1", 1, 3e-3, 100.0, 90.0), entry("fast", 0, 3e-3, 500.0, 400.0),
                      entry("slow", 0, 1e-3, 200.0, 150.0), entry("slow-seed1", 1, 1e-3, 220.0, 170.0)])
    groups = {g["schedule"]: g for g in acip_schedule.repeats(schedules)}
    assert set(groups) == {"fast", "slow"} and groups["fast"]["variants"] == ["fast", "fast-seed1"]
    fast, slow = groups["fast"]["retentions"]["0.60"], groups["slow"]["retentions"]["0.60"]
    assert (fast["validation_mean"], fast["validation_min"], fast["validation_max"]) == (300.0, 100.0, 500.0)
    assert slow["validation_mean"] == 210.0 and slow["evaluation_mean"] == pytest.approx(160.0)
    assert min(groups.values(), key=lambda g: g["retentions"]["0.60"]["validation_mean"])["schedule"] == "slow"


def test_acip_budget_rows_carry_the_seconds_of_their_own_stages(monkeypatch, tmp_path):
    """A recovered row sums nothing: it reports its compress, train and evaluate stages' own seconds, read from the
    stage markers, and a stage without a marker reads as None (never another row's time)."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    import acip_budget

    times = {("compress", "air-r0.60"): 11.0, ("train", "air-r0.60"): 22.0, ("eval", "air-r0.60"): 3.0,
             ("eval", "air-r0.60+lora"): 4.0, ("compress", "acip-r0.60"): 55.0}
    for (stage, name), sec in times.items():
        (tmp_path / stage / name).mkdir(parents=True)
        (tmp_path / stage / name / "stage.json").write_text(json.dumps({"key": "k", "seconds": sec, "result": {}}))
    row = {"tokens": {"training": 0, "calibration": 0}, "compress": {"retention_actual": 0.6}}
    report = {"setup": {"lora_train_tokens": 65536},
              "rows": [{**row, "name": "air-r0.60", "method": "air", "lora": False},
                       {**row, "name": "air-r0.60+lora", "method": "air", "lora": True},
                       {**row, "name": "acip-r0.60", "method": "acip", "lora": False}]}
    rows = acip_budget.summarize(report, 1, tmp_path)["rows"]
    assert rows["AIR"]["stage_seconds"] == {"compress": 11.0, "evaluate": 3.0}
    assert rows["AIR + LoRA"]["stage_seconds"] == {"compress": 11.0, "train": 22.0, "evaluate": 4.0}
    assert rows["ACIP-style"]["stage_seconds"] == {"compress": 55.0, "evaluate": None}
    assert "stage_seconds" not in acip_budget.summarize(report, 1)["rows"]["AIR"]


def test_every_result_is_cited_and_the_index_is_current():
    """benchmarks/results keeps what the READMEs cite (or a cited result was built from), listed in INDEX.md."""
    proc = subprocess.run([sys.executable, str(BENCH / "index.py"), "--check"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_benchmark_imports_a_private_name():
    import ast

    for script in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("air_ft"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{script.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.value.id in ("air_ft", "compress", "stages"):
                raise AssertionError(f"{script.name} reads {node.value.id}.{node.attr}")


def test_acip_claims_hold_only_on_every_text_and_beyond_two_standard_errors(monkeypatch):
    """benchmarks/acip_claims.py: perplexity holds only when lower on every held-out text; accuracy only when the
    mean is higher by more than two standard errors of the (unpaired) difference; pairs are matched by retention
    and LoRA, and a retention without an ACIP-style row is not compared."""
    monkeypatch.syspath_prepend(str(BENCH))
    import acip_claims

    def row(name, ppl, accs, se=0.02):
        method, rest = name.split("-r")
        return {"name": name, "method": method, "retention": float(rest[:4]), "lora": name.endswith("+lora"),
                "tokens": {"training": 1}, "perplexity": {"britannica": {"ppl": ppl[0]}, "plays": {"ppl": ppl[1]}},
                "tasks": {f"t{i}": {"acc": a, "acc_stderr": se, "chance": 0.25} for i, a in enumerate(accs)}}

    report = {"rows": [row("acip-r0.60", (100, 100), [0.30, 0.30]), row("air-r0.60", (50, 60), [0.36, 0.36]),
                       row("acip-r0.60+lora", (80, 40), [0.30, 0.30]), row("air-r0.60+lora", (60, 50), [0.31, 0.31]),
                       row("air-r0.40", (10, 10), [0.9, 0.9])]}
    out = {(r["ours"], r["theirs"]): r for r in acip_claims.claims(report)}
    assert set(out) == {("air-r0.60", "acip-r0.60"), ("air-r0.60+lora", "acip-r0.60+lora")}
    alone, lora = out[("air-r0.60", "acip-r0.60")], out[("air-r0.60+lora", "acip-r0.60+lora")]
    # 6 points, SE of the difference hypot(0.02 / sqrt 2, 0.02 / sqrt 2) = 0.02: 3 SE
    assert alone["perplexity_verdict"] == "held" and alone["accuracy_verdict"] == "held"
    assert alone["accuracy"]["se"] == pytest.approx(0.02) and alone["accuracy"]["z"] == pytest.approx(3.0)
    assert alone["perplexity"]["plays"]["relative"] == pytest.approx(-0.4)
    assert lora["perplexity_verdict"] == "not resolved" and lora["accuracy_verdict"] == "not resolved"
    assert "equal total training tokens" in lora["claim"]


def test_the_dense_check_scores_the_recipes_texts_and_records_the_model(monkeypatch, tmp_path, tokenizer, text):
    """benchmarks/task_choice.py --texts: the dense model's perplexity on every evaluation text of the recipe (what
    ``air_ft.evaluate_perplexity`` gives), the task rows, and what the model name resolved to, in one JSON (a single
    model file's size and sha256: tests/test_assets.py)."""
    import json

    import yaml

    from air_ft import evaluate_perplexity, load_model

    from .conftest import save_piqa_like, study_base, tiny_llama

    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import task_choice

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    base = study_base(tmp_path, tiny_llama(vocab_size=len(tokenizer)), tokenizer, text)
    save_piqa_like(tmp_path / "tasks", n=8)
    recipe = {**base, "eval": {"seq_len": 32, "max_windows": 3, "task_batch_size": 4,
                               "task_data": str(tmp_path / "tasks")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", ["task_choice.py", "--recipe", str(tmp_path / "r.yaml"), "--tasks", "piqa",
                                      "--limit", "4", "--texts", "--output", "check.json"])
    task_choice.main()
    out = json.loads((tmp_path / "check.json").read_text())
    model, tok = load_model(str(tmp_path / "base"))
    heldout = text[int(0.8 * len(text)):]
    assert set(out["perplexity"]) == {"heldout", "seconds"}
    assert out["perplexity"]["heldout"] == pytest.approx(evaluate_perplexity(model, tok, heldout, 32, 3)["ppl"],
                                                         rel=1e-3)
    assert out["model_file"] == {"name": str(tmp_path / "base"), "path": str(tmp_path / "base")}
    assert [r["task"] for r in out["rows"]] == ["piqa"] and out["rows"][0]["n"] == 4


def test_a_recipe_outside_the_repository_is_named_by_its_absolute_path(monkeypatch, tmp_path):
    """benchmarks/common.py: the JSON names a recipe of the repository relative to it and a user's own recipe
    elsewhere by its absolute path (it used to raise at the very end of a study, after hours of work)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    assert common.repo_path(BENCH.parent / "recipes" / "smollm2-135m" / "recovery.yaml") == \
        str(Path("recipes") / "smollm2-135m" / "recovery.yaml")
    mine = tmp_path / "mine.yaml"
    assert common.repo_path(mine) == str(mine.resolve())


def test_the_refinement_probe_reads_a_checkpoints_blocks_and_reports_every_rate(tmp_path, tokenizer, text):
    """The probe runs the compression's block refinement on a factored checkpoint's blocks at each rate and writes
    the exit error before and after, the kept-best rule off (``after`` may rise; ``kept`` never does)."""
    import json

    import air_ft
    from tests.conftest import make_text, tiny_llama

    dense_dir, ckpt = tmp_path / "dense", tmp_path / "ckpt"
    model = tiny_llama(vocab_size=len(tokenizer), layers=2)
    model.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    (tmp_path / "cal.txt").write_text(make_text(4000, 2))
    air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, num_samples=8, seq_len=32,
                    progress=False, cache=False)
    air_ft.save_compressed(model, tokenizer, ckpt)
    (tmp_path / "r.yaml").write_text(f"model: {{name_or_path: {dense_dir}, dtype: float32}}\n"
                                     f"data: {{calibration: [{{source: {tmp_path / 'cal.txt'}}}]}}\n"
                                     "compress: {num_samples: 8, seq_len: 32, batch_size: 4}\n")
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(BENCH / "refine_probe.py"), "--recipe", str(tmp_path / "r.yaml"),
                           "--checkpoint", str(ckpt), "--blocks", "0", "1", "--steps", "3", "--rates",
                           "absolute:1e-2", "rms:1e-1", "absolute:10", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["block"], r["lr_scale"], r["lr"]) for r in rows] == [
        (b, s, lr) for b in (0, 1) for s, lr in (("absolute", 1e-2), ("rms", 1e-1), ("absolute", 10.0))]
    assert result["windows"] == 8 and result["windows_per_step"] == 4 and result["steps"] == 3
    for r in rows:
        assert r["kept"] == min(r["before"], r["after"]) and r["ratio"] == pytest.approx(r["after"] / r["before"])
    assert all(r["after"] > r["before"] for r in rows if r["lr"] == 10.0)  # a rate far too large: recorded, not kept
    assert rows[0]["before"] == rows[1]["before"] != rows[3]["before"]  # one start per block
