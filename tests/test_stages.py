"""The study (``air-ft run``) on a tiny local model: every stage writes its directory, a rerun reuses what is finished,
a changed section is redone, a killed study continues; the report renders from its JSON; every error type reaches
the command line as one line with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from air_ft.cli import main
from air_ft.config import RecipeError, load_recipe
from air_ft.pipeline import commands
from air_ft.pipeline.execute import run_study

from .conftest import save_piqa_like, study_base, tiny_llama


@pytest.fixture
def study(tmp_path, tokenizer, text):
    save_piqa_like(tmp_path / "tasks", n=12)
    recipe = {
        **study_base(tmp_path, tiny_llama(vocab_size=len(tokenizer), tie=True), tokenizer, text),
        "compress": {"retention": 0.5, "num_samples": 8, "seq_len": 32, "progress": False},
        "eval": {"seq_len": 32, "max_windows": 4, "tasks": ["piqa"], "limit": 6, "task_batch_size": 4,
                 "task_data": str(tmp_path / "tasks"), "decode_batch_sizes": [1, 2]},
        "lora": {"rank": 2},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 32, "learning_rate": 1e-3, "save_steps": 0,
                  "eval_steps": 0, "progress": False},
        "study": {"methods": ["svdllm", "air"], "retentions": [0.5], "lora": True},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return tmp_path, path


def _finished(out) -> dict[str, str]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["finished"] + json.loads(p.read_text())["key"]
            for p in (out / "stages").rglob("stage.json")}


def test_study_writes_report_and_a_rerun_reuses_every_stage(study, monkeypatch, capsys):
    tmp, path = study
    assert main(["run", "--recipe", str(path)]) == 0
    out = tmp / "out"
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["dense", "svdllm-r0.50", "svdllm-r0.50+lora", "air-r0.50", "air-r0.50+lora"]
    for row in report["rows"]:
        assert row["perplexity"]["heldout"]["ppl"] > 0 and row["tasks"]["piqa"]["n"] == 6
        assert set(row["efficiency"]["decode_s_per_token"]) == {"1", "2"} and row["efficiency"]["rounds"] == 3
    lora_row = report["rows"][2]
    assert lora_row["train"]["tokens"] == 2 * 2 * 32 and lora_row["train_log"]
    assert report["provenance"]["tasks"]["piqa"]["split"] == "validation"
    assert report["provenance"]["texts"]["heldout"]["sha256"]
    md = (out / "report.md").read_text()
    table = md.split("\n\n")[1]  # the first table: one row per model
    assert table.count("| SVD-LLM(W)") == 2 and table.count("| AIR") == 2 and "**" in table and "## Setup" in md
    for png in ("perplexity.png", "accuracy.png", "train_loss.png", "efficiency.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
    # the factored rows really are factored at the grid's retention
    assert abs(report["rows"][1]["efficiency"]["params"]["retention"] - 0.5) < 0.02
    # one measurement per layer shape: dense, and the one factored shape of both methods and their merged LoRA
    assert [r["efficiency"]["measured_on"] for r in report["rows"]] == ["dense"] + ["svdllm-r0.50"] * 4
    assert set(json.loads((out / "stages" / "efficiency" / "stage.json").read_text())["result"]) >= {
        "dense", "svdllm-r0.50"}
    assert "share one measurement" in md
    before = _finished(out)
    assert len(before) == 10  # 1 + 2 x (compress, eval, train, eval) + the efficiency measurement

    def fail(*a, **k):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr(commands, "compress", fail)
    monkeypatch.setattr(commands, "train", fail)
    monkeypatch.setattr(commands, "evaluate_model", fail)
    capsys.readouterr()
    assert main(["run", "--recipe", str(path)]) == 0
    assert _finished(out) == before and capsys.readouterr().out.count("reused") == 10
    # a study measured with another memory measure is measured again, and nothing else is redone
    import air_ft.efficiency  # noqa: F401  (the package's name `efficiency` is the function)

    monkeypatch.setattr(sys.modules["air_ft.efficiency"], "MEMORY_MEASURE", "an earlier measure")
    assert main(["run", "--recipe", str(path)]) == 0
    after = _finished(out)
    assert [k for k in after if after[k] != before[k]] == ["stages/efficiency"]


def test_a_results_only_copy_reuses_its_results_and_rebuilds_checkpoints_only_when_needed(study, monkeypatch):
    """What a repository keeps of a study (markers and logs, no checkpoints): a rerun reuses every result; a
    changed evaluation recompresses and retrains the models it must load, and gets the same perplexities."""
    import shutil

    tmp, path = study
    base = ["eval.tasks=[]", "eval.efficiency=false", "study.methods=[air]"]
    run_study(load_recipe(str(path), base))
    out = tmp / "out"
    first = json.loads((out / "report.json").read_text())
    # without the speed measurement the size column is still filled, counted when each model was evaluated
    dense, compressed, recovered = first["rows"]
    assert compressed["efficiency"] is None and compressed["params"] == compressed["compress"]["model_params_after"]
    assert dense["params"] == compressed["compress"]["model_params_before"] and recovered["params"] > 0
    table = (out / "report.md").read_text().split("\n\n")[1].splitlines()[2:]  # the first table's rows
    assert len(table) == 3 and all(f"| {r['params'] / 1e3:.1f} K |" in line for r, line in zip(first["rows"], table))
    for heavy in ("compress/air-r0.50/checkpoint", "train/air-r0.50/merged", "train/air-r0.50/adapter",
                  "train/air-r0.50/checkpoints"):
        shutil.rmtree(out / "stages" / heavy)
    before = _finished(out)
    real_compress, real_train = commands.compress, commands.train
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    monkeypatch.setattr(commands, "train", lambda *a, **k: pytest.fail("retrained"))
    run_study(load_recipe(str(path), base))
    assert _finished(out) == before
    monkeypatch.setattr(commands, "compress", real_compress)
    monkeypatch.setattr(commands, "train", real_train)
    # under a launcher with several processes the main one may recompress alone, but never retrain alone
    import accelerate

    class TwoProcesses:
        num_processes, is_main_process, device = 2, True, "cpu"

        def wait_for_everyone(self):
            pass

    one_process = accelerate.PartialState
    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    with pytest.raises(RecipeError, match="merged is missing: rebuild it with one process"):
        run_study(load_recipe(str(path), [*base, "eval.max_windows=3"]))
    assert (out / "stages/compress/air-r0.50/checkpoint/air_ft.json").exists()
    assert not (out / "stages/train/air-r0.50/merged").exists() and _finished(out)["stages/train/air-r0.50"]
    monkeypatch.setattr(accelerate, "PartialState", one_process)
    run_study(load_recipe(str(path), [*base, "eval.max_windows=3"]))
    assert (out / "stages/compress/air-r0.50/checkpoint/air_ft.json").exists()
    assert (out / "stages/train/air-r0.50/merged/air_ft.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "stages/train/air-r0.50/train_log.jsonl").read_text()
             .splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the retraining started a fresh loss log
    run_study(load_recipe(str(path), base))  # back to the first evaluation: its results were redone
    again = json.loads((out / "report.json").read_text())
    for a, b in zip(first["rows"], again["rows"]):
        assert a["name"] == b["name"]
        assert abs(a["perplexity"]["heldout"]["ppl"] - b["perplexity"]["heldout"]["ppl"]) < 1e-3 * a[
            "perplexity"]["heldout"]["ppl"], a["name"]


def test_changing_only_eval_re_evaluates_without_recompressing_or_retraining(study, monkeypatch):
    tmp, path = study
    recipe = load_recipe(str(path), ["study.lora=false", "study.methods=[svdllm]", "eval.tasks=[]",
                                     "eval.efficiency=false"])
    run_study(recipe)
    before = _finished(tmp / "out")
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    run_study(load_recipe(str(path), ["study.lora=false", "study.methods=[svdllm]", "eval.tasks=[]",
                                             "eval.efficiency=false", "eval.max_windows=2"]))
    after = _finished(tmp / "out")
    assert after["stages/compress/svdllm-r0.50"] == before["stages/compress/svdllm-r0.50"]
    assert after["stages/eval/svdllm-r0.50"] != before["stages/eval/svdllm-r0.50"]  # re-evaluated
    assert after["stages/eval/dense"] != before["stages/eval/dense"]
    run_study(load_recipe(str(path), ["study.lora=false", "study.methods=[svdllm]", "eval.tasks=[]",
                                             "eval.efficiency=true", "eval.efficiency_rounds=1",
                                             "eval.max_windows=2"]))
    measured = _finished(tmp / "out")
    assert {k: v for k, v in measured.items() if "efficiency" not in k} == after  # speed settings: no re-evaluation
    assert "stages/efficiency" in measured


def test_a_changed_compress_section_redoes_compression(study):
    tmp, path = study
    base = ["study.lora=false", "study.methods=[air]", "eval.tasks=[]", "eval.efficiency=false"]
    run_study(load_recipe(str(path), base))
    before = _finished(tmp / "out")
    run_study(load_recipe(str(path), [*base, "compress.delta=0.5"]))
    after = _finished(tmp / "out")
    assert after["stages/compress/air-r0.50"] != before["stages/compress/air-r0.50"]
    assert after["stages/eval/dense"] == before["stages/eval/dense"]


def test_execution_settings_keep_the_compression_and_sequential_redoes_it(study, monkeypatch):
    tmp, path = study
    base = ["study.lora=false", "study.methods=[svdllm]", "eval.tasks=[]", "eval.efficiency=false"]
    run_study(load_recipe(str(path), base))
    before = _finished(tmp / "out")
    real = commands.compress
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    run_study(load_recipe(str(path), [*base, "compress.stats_memory_gb=0.5", "compress.cache=false",
                                             "compress.checkpointing=true", "compress.data_parallel=false"]))
    assert _finished(tmp / "out") == before
    monkeypatch.setattr(commands, "compress", real)
    run_study(load_recipe(str(path), [*base, "compress.sequential=false"]))
    after = _finished(tmp / "out")
    assert after["stages/compress/svdllm-r0.50"] != before["stages/compress/svdllm-r0.50"]


def test_a_killed_study_continues_from_its_finished_stages(study, monkeypatch):
    tmp, path = study
    recipe = load_recipe(str(path), ["study.lora=false", "eval.tasks=[]", "eval.efficiency=false"])
    real, calls = commands.evaluate_model, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(commands, "evaluate_model", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_study(recipe)
    done = _finished(tmp / "out")
    assert set(done) == {"stages/eval/dense", "stages/compress/svdllm-r0.50", "stages/eval/svdllm-r0.50",
                         "stages/compress/air-r0.50"}
    assert not (tmp / "out" / "report.json").exists()
    monkeypatch.setattr(commands, "evaluate_model", real)
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    run_study(recipe)
    after = _finished(tmp / "out")
    assert {k: after[k] for k in done} == done and "stages/eval/air-r0.50" in after
    assert (tmp / "out" / "report.json").exists()


def _fixture_report() -> dict:
    def row(name, method, retention, lora, ppl, acc, err, decode):
        return {"name": name, "method": method, "retention": retention, "lora": lora,
                "perplexity": {"wiki": {"ppl": ppl}},
                "tasks": {"piqa": {"acc": acc - 0.02, "acc_stderr": err, "acc_norm": acc, "acc_norm_stderr": err},
                          "winogrande": {"acc": acc, "acc_stderr": err}},
                "efficiency": {"params": {"model": 100e6 * retention}, "flops_per_token": 2e8 * retention,
                               "checkpoint_bytes": 4e8 * retention,
                               "peak_forward_bytes": 1e8 if retention == 1 else 1.05e8,
                               "peak_forward_measure": "test", "prefill_tokens_per_s": 100 / retention,
                               "decode_s_per_token": {"1": decode, "16": decode * 2}, "device": "cpu",
                               "dtype": "float32", "threads": 1}}

    return {"title": "fixture", "setup": {"model": "m", "dtype": "float32", "device": "cpu", "tasks": ["piqa"],
                                          "task_limit": 100, "seed": 0},
            "environment": {"lm-eval": "0.4.13"},
            "provenance": {"tasks": {"piqa": {"split": "validation", "papers_split": "validation", "n": 100},
                                     "winogrande": {"split": "validation", "papers_split": "validation"}}},
            "rows": [row("dense", "dense", 1.0, False, 10.0, 0.70, 0.02, 0.010),
                     row("svdllm-r0.60", "svdllm", 0.6, False, 40.0, 0.55, 0.02, 0.012),
                     row("air-r0.60", "air", 0.6, False, 30.0, 0.62, 0.02, 0.009)]}


def test_report_renders_from_a_results_file(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps(_fixture_report()))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | retention | ppl wiki | piqa (acc_norm) | winogrande (acc) | mean acc")
    assert "| **10.00** |" in table[1] and "| 40.00 |" in table[2]  # best perplexity in bold
    assert "**9.0**" in table[3]  # AIR decodes fastest at batch 1
    # 0.62 vs 0.55 with stderr 0.02 each: 7 points > 2 SE (5.7)
    assert "piqa at 0.60: AIR 62.0 vs SVD-LLM(W) 55.0 (+7.0 points, 2 SE = 5.7)" in md
    # AIR against SVD-LLM(W): ppl 30 vs 40 is -25 %; mean acc (0.62 + 0.62) / 2 - 0.55 = +7.0 points; SE of each
    # mean sqrt(2 x 0.02^2) / 2 = 1.41 points, of the difference 2.0; piqa 7 points over hypot(2, 2) = 2.47 SE
    assert "| 0.60 | AIR | SVD-LLM(W) | -25.0 % | +7.0 +- 2.0 | +2.47 | 0/0 |" in md
    pair = json.loads((tmp_path / "report.json").read_text())["head_to_head"]
    assert len(pair) == 1 and pair[0]["against"] == "svdllm-r0.60"
    assert pair[0]["mean_acc_diff_se"] == pytest.approx(0.02)
    assert "SVD-LLM(W) at 0.60, decode batch 1: 1.20x dense" in md  # slower than dense is said
    assert "Above dense in peak forward memory" in md and "- AIR at 0.60: 1.05x dense" in md  # so is more memory
    assert "rank-k intermediate" in md and "fragment" not in md
    # measured as the resident set, the excess is not blamed on activations
    from air_ft.report import markdown

    old = _fixture_report()
    for r in old["rows"]:
        r["efficiency"]["peak_forward_measure"] = "process resident set, sampled every 1 ms, above the level before"
    old_md = markdown(old)
    assert "- AIR at 0.60: 1.05x dense" in old_md and "fragment the heap" in old_md
    assert "rank-k intermediate" not in old_md
    # a rounding-level excess (1.00x in the table) is not listed; a shape measured from a ranks map is said
    near = _fixture_report()
    near["rows"][2]["efficiency"]["peak_forward_bytes"] = 1.001e8
    near["rows"][1]["efficiency"]["built_from"] = "the dense model factored at the row's ranks map (its checkpoint...)"
    near_md = markdown(near)
    assert "- SVD-LLM(W) at 0.60: 1.05x dense" in near_md and "- AIR at 0.60: " not in near_md
    assert "factored at the row's ranks map, its checkpoint not being kept" in near_md
    assert "SVD-LLM(W) at 0.60." in near_md and "AIR at 0.60." not in near_md
    for png in ("perplexity.png", "accuracy.png", "efficiency.png"):
        assert (tmp_path / "plots" / png).exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_size_column_falls_back_from_the_speed_measurement_to_the_evaluation_count():
    from air_ft.report import _fmt_params, _model_params

    assert _model_params({"efficiency": {"params": {"model": 7}}, "params": 5}) == 7
    assert _model_params({"efficiency": None, "params": 5, "compress": {"model_params_after": 3}}) == 5
    # a stage evaluated before the count was kept: the compressed model's size, never for a row that trained
    assert _model_params({"lora": False, "compress": {"model_params_after": 3}}) == 3
    assert _model_params({"lora": True, "compress": {"model_params_after": 3}}) is None
    assert [_fmt_params(n) for n in (91_947_680, 6_738_415_616, 52_800)] == ["91.9 M", "6.74 B", "52.8 K"]


@pytest.mark.parametrize("error, message", [
    ("recipe", "unknown key(s) ['eval.bogus']"),
    ("task", "unknown lm-eval task(s) ['piqaa']"),
    ("taskdata", "task data folder"),
    ("data", "fewer than one window"),
    ("missing", "is neither a file nor a known dataset"),
    ("calibration", "NaN or Inf"),
    ("whitening", "Gram matrix is all zeros"),
    ("oom", "out of memory; lower compress.batch_size"),
    ("disk", "no space left on the disk; free some"),
])
def test_every_error_type_reaches_the_cli_as_one_line(study, monkeypatch, capsys, error, message):
    """Each kind of bad input, made for real (a poisoned or silent model, a missing file, a bad key), stops the
    study with one line that says what to change; out of memory (which a CPU test cannot cause) is raised where
    evaluation would raise it, and the line checked is the CLI's own."""
    from transformers import AutoModelForCausalLM

    tmp, path = study
    args = ["run", "--recipe", str(path), "study.lora=false", "eval.tasks=[]", "eval.efficiency=false",
            "compress.cache=false"]
    if error in ("calibration", "whitening"):  # a model whose activations overflow, or whose first block sees zeros
        model = AutoModelForCausalLM.from_pretrained(tmp / "base")
        with torch.no_grad():
            if error == "calibration":
                model.model.layers[1].post_attention_layernorm.weight.fill_(float("inf"))
            else:
                model.model.layers[0].input_layernorm.weight.zero_()
        model.save_pretrained(tmp / "base")
        args.append("study.dense=false")
    if error == "recipe":
        args.append("eval.bogus=1")
    elif error == "task":
        args.append("eval.tasks=[piqaa]")
    elif error == "taskdata":
        args += ["eval.tasks=[piqa]", f"eval.task_data={tmp / 'no-such-folder'}"]
    elif error == "data":
        args.append("eval.seq_len=100000")
    elif error == "missing":
        args.append(f"data.evaluation.heldout.source={tmp / 'nope.txt'}")
    elif error == "oom":
        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(commands, "evaluate_model", oom)
    elif error == "disk":  # the disk fills while a compressed checkpoint is written, as safetensors reports it
        import transformers.modeling_utils
        from safetensors import SafetensorError

        def full(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
        args.append("study.dense=false")
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("air-ft:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp / "out" / "report.json").exists()
    if error in ("recipe", "task", "taskdata"):  # known before any work
        assert not (tmp / "out" / "stages").exists()
    if error == "disk":  # the stage that failed left no marker and no checkpoint that looks complete
        assert not list((tmp / "out").rglob("stage.json")) and not list((tmp / "out").rglob("model.safetensors"))


def test_eval_scores_a_dense_checkpoint_and_the_recipe_model(study):
    tmp, path = study
    assert main(["eval", "--recipe", str(path), "--checkpoint", str(tmp / "base"), "eval.efficiency=false"]) == 0
    result = json.loads((tmp / "base" / "eval.json").read_text())
    assert result["perplexity"]["heldout"]["ppl"] > 0 and result["tasks"]["piqa"]["n"] == 6
    assert main(["eval", "--recipe", str(path), "eval.efficiency=false", "eval.tasks=[]"]) == 0  # the recipe's model
    again = json.loads((tmp / "out" / "eval.json").read_text())
    assert again["perplexity"]["heldout"]["ppl"] == pytest.approx(result["perplexity"]["heldout"]["ppl"])
    assert main(["eval", "--recipe", str(path), "--checkpoint", str(tmp / "missing")]) == 2


def test_run_under_accelerate_launch(study):
    import os
    import subprocess
    from pathlib import Path

    tmp, path = study
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "accelerate_configs" / "cpu.yaml"), "-m", "air_ft", "run", "--recipe", str(path),
           "study.methods=[svdllm]", "eval.efficiency=false", "eval.tasks=[]"]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["dense", "svdllm-r0.50", "svdllm-r0.50+lora"]
    assert report["rows"][2]["train"]["global_step"] == 2


def test_share_of_dense_above_chance_accuracy_with_its_standard_error():
    from air_ft.report import above_chance, markdown
    from air_ft.rows import above_chance_share

    def task(acc, se, chance, norm=True):
        key = "acc_norm" if norm else "acc"
        return {"acc": acc, "acc_stderr": se, **({"acc_norm": acc, "acc_norm_stderr": se} if norm else {}),
                key: acc, f"{key}_stderr": se, "chance": chance}

    dense = {"name": "dense", "method": "dense", "retention": 1.0, "perplexity": {},
             "tasks": {"piqa": task(0.70, 0.02, 0.5), "winogrande": task(0.55, 0.02, 0.5, norm=False),
                       "arc_easy": task(0.55, 0.02, 0.25)}}
    row = {"name": "air-r0.80", "method": "air", "retention": 0.8, "perplexity": {},
           "tasks": {"piqa": task(0.60, 0.03, 0.5), "winogrande": task(0.52, 0.03, 0.5, norm=False),
                     "arc_easy": task(0.40, 0.03, 0.25)}}
    share = above_chance_share(row, dense)
    # piqa: (0.60 - 0.5) / (0.70 - 0.5) = 0.5, SE hypot(0.03, 0.5 x 0.02) / 0.2; arc_easy: 0.15 / 0.30 = 0.5,
    # SE hypot(0.03, 0.01) / 0.3; winogrande: dense only 5 points above chance, shown but not counted
    assert share["qualifying"] == ["piqa", "arc_easy"] and not share["tasks"]["winogrande"]["qualifies"]
    assert share["tasks"]["winogrande"]["share"] == pytest.approx(0.4)
    assert share["tasks"]["piqa"]["se"] == pytest.approx(0.0316228 / 0.2, rel=1e-5)
    assert share["mean"] == pytest.approx(0.5)
    assert share["mean_se"] == pytest.approx(((0.0316228 / 0.2) ** 2 + (0.0316228 / 0.3) ** 2) ** 0.5 / 2, rel=1e-5)
    assert above_chance_share({**row, "tasks": {"piqa": {**row["tasks"]["piqa"], "chance": None}}}, dense) is None
    report = {"rows": [dense, row]}
    assert above_chance(report)["air-r0.80"]["mean"] == pytest.approx(0.5)
    md = markdown(report)
    assert "## Share of dense's above-chance accuracy" in md and "winogrande (not counted)" in md
    assert "| AIR | 0.80 | 0.50 ± 0.16 | 0.40 ± 0.62 | 0.50 ± 0.11 | 0.50 ± 0.10 |" in md
    assert "| dense (points above chance) | 1.00 | +20.0 | +5.0 | +30.0 | |" in md
    assert above_chance({"rows": [row]}) == {}  # no dense row: nothing to share


def test_the_recorded_commit_says_when_the_package_differs_from_it(tmp_path):
    """Figures from uncommitted code carry ``+dirty``: a commit alone would claim code that no commit holds."""
    import subprocess

    from air_ft.pipeline.provenance import git_commit
    from air_ft.report import _short

    pkg = tmp_path / "repo" / "air_ft"
    pkg.mkdir(parents=True)
    (pkg / "m.py").write_text("x = 1\n")
    (tmp_path / "repo" / "results.json").write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path / "repo")]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(pkg) == head
    (tmp_path / "repo" / "results.json").write_text('{"a": 1}\n')  # results written beside: still the commit
    assert git_commit(pkg) == head
    (pkg / "m.py").write_text("x = 2\n")
    assert git_commit(pkg) == head + "+dirty"
    assert _short(head + "+dirty") == head[:10] + "+dirty" and _short(head) == head[:10]
    assert git_commit(tmp_path) == ""  # outside a checkout


@pytest.mark.parametrize("study", sorted(p.parent.name for p in (Path(__file__).resolve().parents[1] / "benchmarks"
                                                                  / "results").glob("*/report.json")))
def test_every_committed_report_is_what_its_json_renders(study):
    """``air-ft report DIR`` re-renders a committed report unchanged: its markdown and its derived tables come from
    its report.json alone (a change of the renderer that would alter a published report fails here)."""
    from air_ft.report import above_chance, head_to_head, markdown

    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / study
    report = json.loads((out / "report.json").read_text())
    assert markdown(report) == (out / "report.md").read_text()
    assert json.loads(json.dumps(head_to_head(report))) == report["head_to_head"]
    assert json.loads(json.dumps(above_chance(report))) == report["above_chance"]


def test_a_run_of_part_of_the_grid_keeps_the_directorys_other_finished_rows_in_its_report(study, monkeypatch, capsys):
    """A run of one method into a directory that holds a finished grid reports the whole grid (its speed measurement
    included) and records the joined grid; rows that a changed setting invalidated are left out, not mixed in."""
    tmp, path = study
    out = tmp / "out"
    base = ["study.lora=false", "eval.tasks=[]", "eval.efficiency_rounds=1"]
    run_study(load_recipe(str(path), [*base, "study.methods=[svdllm,air]"]))
    full = json.loads((out / "report.json").read_text())
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    capsys.readouterr()
    run_study(load_recipe(str(path), [*base, "study.methods=[air]", "eval.efficiency=false"]))
    assert "also 1 rows this directory holds from an earlier run (svdllm-r0.50)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["dense", "air-r0.50", "svdllm-r0.50"]  # this run's grid first
    same = {r["name"]: r for r in full["rows"]}
    for b in report["rows"]:
        assert same[b["name"]]["perplexity"] == b["perplexity"] and same[b["name"]]["efficiency"] == b["efficiency"]
        assert b["efficiency"] is not None
    assert report["recipe"]["study"]["methods"] == ["air", "svdllm"]
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["study"]["methods"] == ["air", "svdllm"]
    assert (out / "report.md").read_text().split("\n\n")[1].count("| SVD-LLM(W)") == 1
    # another evaluation setting: the earlier svdllm row no longer holds, and only this run's rows are reported
    run_study(load_recipe(str(path), [*base, "study.methods=[air]", "eval.efficiency=false", "eval.max_windows=3"]))
    assert "also" not in capsys.readouterr().out
    assert [r["name"] for r in json.loads((out / "report.json").read_text())["rows"]] == ["dense", "air-r0.50"]


def test_a_run_of_some_variants_keeps_the_directorys_other_variants_and_refuses_a_renamed_setting(study, monkeypatch,
                                                                                                 capsys):
    """The lever benchmarks run a few variants at a time into one directory: a run of one variant reports the
    variants an earlier run finished there; a variant whose name now means other settings joins nothing."""
    tmp, path = study
    out = tmp / "out"
    base = ["study.lora=false", "eval.tasks=[]", "eval.efficiency=false", "study.methods=[svdllm]"]
    run_study(load_recipe(str(path), [*base, "study.variants={a: {delta: 1.0}, b: {output_weight: 0.5}}"]))
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    capsys.readouterr()
    run_study(load_recipe(str(path), [*base, "study.variants={b: {output_weight: 0.5}}"]))
    assert "also 1 rows this directory holds from an earlier run (svdllm-r0.50-a)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["dense", "svdllm-r0.50-b", "svdllm-r0.50-a"]
    assert list(yaml.safe_load((out / "recipe.resolved.yaml").read_text())["study"]["variants"]) == ["b", "a"]
    monkeypatch.undo()
    run_study(load_recipe(str(path), [*base, "study.variants={a: {output_weight: 1.0}}"]))  # 'a' renamed
    assert "also" not in capsys.readouterr().out
    assert [r["name"] for r in json.loads((out / "report.json").read_text())["rows"]] == ["dense", "svdllm-r0.50-a"]


def test_a_results_only_copy_measures_speed_on_its_rows_shapes_without_compressing_again(study, monkeypatch):
    """Speed and size depend on the layer shapes alone: where a row's checkpoint is gone, the speed stage measures
    the dense model factored at the row's ranks map, and every shape-only figure equals the checkpoint's."""
    import shutil

    tmp, path = study
    out = tmp / "out"
    base = ["study.lora=false", "study.methods=[svdllm]", "eval.tasks=[]", "eval.efficiency_rounds=1"]
    first = run_study(load_recipe(str(path), base))["rows"][1]["efficiency"]
    assert first["built_from"] == "checkpoint"
    shutil.rmtree(out / "stages/compress/svdllm-r0.50/checkpoint")
    monkeypatch.setattr(commands, "compress", lambda *a, **k: pytest.fail("recompressed"))
    again = run_study(load_recipe(str(path), [*base, "eval.decode_batch_sizes=[1]"]))["rows"]
    dense, row = again[0]["efficiency"], again[1]["efficiency"]
    assert "ranks map" in row["built_from"] and dense["built_from"] == "dense model"
    for key in ("params", "flops_per_token", "checkpoint_bytes"):
        assert row[key] == first[key], key
    assert row["params"]["retention"] < 0.6 and row["decode_s_per_token"]["1"] > 0
    assert not (out / "stages/compress/svdllm-r0.50/checkpoint").exists()


def test_a_full_disk_is_told_apart_from_other_os_errors():
    """air_ft.cli.disk_full: ENOSPC / EDQUOT, also as the cause of another error or only in a writer's message, is
    the full disk; a missing file or a refused permission is not (those keep their traceback as bugs would)."""
    import errno

    from air_ft.cli import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving the checkpoint failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not disk_full(OSError(errno.ENOENT, "No such file or directory"))
    assert not disk_full(PermissionError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("shape mismatch"))
