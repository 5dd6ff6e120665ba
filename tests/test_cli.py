"""The ``air-ft`` command line on a tiny local model: compress, eval, export-dense, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

import air_ft
from air_ft.cli import main

from .conftest import tiny_llama


@pytest.fixture
def workspace(tmp_path, tokenizer, text):
    model = tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "corpus.txt").write_text(text)
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tmp_path / "base")},
        "data": {"calibration": [{"source": str(tmp_path / "corpus.txt"), "end": 0.8}],
                 "evaluation": {"heldout": {"source": str(tmp_path / "corpus.txt"), "start": 0.8}}},
        "compress": {"method": "air", "retention": 0.5, "num_samples": 8, "seq_len": 32, "progress": False},
        "eval": {"seq_len": 32},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return tmp_path, path


def test_compress_writes_checkpoint_resolved_recipe_and_metadata(workspace, capsys):
    tmp, recipe = workspace
    assert main(["compress", "--recipe", str(recipe), "compress.delta=0.5"]) == 0
    out = tmp / "out"
    for name in ("air_ft.json", "config.json", "model.safetensors", "recipe.resolved.yaml", "run_metadata.json"):
        assert (out / name).exists(), name
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["compress"]["delta"] == 0.5 and resolved["compress"]["retention"] == 0.5
    printed = capsys.readouterr().out
    assert "heldout: ppl" in printed and "retention" in printed
    model, tok = air_ft.load_compressed(out)
    assert sum(isinstance(m, air_ft.LowRankLinear) for m in model.modules()) == 14

    assert main(["eval", "--recipe", str(recipe), "--checkpoint", str(out), "eval.efficiency=false"]) == 0
    assert "perplexity heldout" in capsys.readouterr().out and (out / "eval.json").exists()
    assert main(["export-dense", str(out), str(tmp / "dense")]) == 0
    assert (tmp / "dense" / "model.safetensors").exists() and not (tmp / "dense" / "air_ft.json").exists()


def test_bad_recipe_fails_fast_with_exit_code_2(workspace, capsys):
    tmp, recipe = workspace
    assert main(["compress", "--recipe", str(tmp / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compress", "--recipe", str(recipe), "compress.retention=2"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    assert main(["compress", "--recipe", str(recipe), "compress.warp=9"]) == 2
    assert "valid keys" in capsys.readouterr().err
    assert main(["compress", "--recipe", str(recipe), "model.name_or_path=./missing/model"]) == 2
    assert not (tmp / "out").exists()


def test_failure_mid_run_leaves_no_checkpoint_and_one_line(workspace, capsys):
    tmp, recipe = workspace
    model = tiny_llama(vocab_size=40)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("inf"))
    model.save_pretrained(tmp / "base")
    assert main(["compress", "--recipe", str(recipe), "compress.cache=false"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("air-ft:")]
    assert len(errors) == 1 and "NaN or Inf" in errors[0] and "Traceback" not in err
    assert not (tmp / "out").exists()


def test_console_entry_point_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "air_ft", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "compress" in res.stdout and "train" in res.stdout


def test_a_bug_keeps_its_traceback_and_bad_input_is_one_line(workspace, monkeypatch, capsys):
    """A mistyped dict key in our code is not the user's fault: it propagates (exit 1 with a traceback from the
    console script); an AirFtError of any kind is one line with exit 2."""
    from air_ft import errors
    from air_ft.pipeline import commands

    tmp, recipe = workspace

    def buggy(recipe, *a, **k):
        return {}["base"]

    monkeypatch.setattr(commands, "compress", buggy)
    with pytest.raises(KeyError, match="base"):
        main(["compress", "--recipe", str(recipe)])
    for kind in (errors.RecipeError, errors.DataError, errors.AssetError, errors.CheckpointError,
                 errors.CalibrationError, errors.WhiteningError, errors.NativeUnavailable, errors.TaskError):
        def bad_input(recipe, *a, kind=kind, **k):
            raise kind(f"{kind.__name__}: change this\nsecond line")

        monkeypatch.setattr(commands, "compress", bad_input)
        assert main(["compress", "--recipe", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert err == f"air-ft: error: {kind.__name__}: change this\n", err
    # and through the console script: exit 1 and the traceback for a bug
    script = ("import sys; from air_ft.pipeline import commands; from air_ft.cli import main\n"
              "commands.compress = lambda recipe: {}['base']\n"
              f"sys.exit(main(['compress', '--recipe', {str(recipe)!r}]))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError: 'base'" in res.stderr


def test_a_native_kernel_that_cannot_be_built_says_what_to_do(workspace, tmp_path):
    """No working C compiler, for real (a fresh kernel cache and $CC pointing nowhere): one line naming the remedy."""
    tmp, recipe = workspace
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "AIR_FT_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "air_ft", "compress", "--recipe", str(recipe),
                          "compress.als_backend=native", "compress.method=air"], capture_output=True, text=True,
                         env=env, timeout=600)
    lines = [line for line in res.stderr.splitlines() if line.startswith("air-ft:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "install gcc or clang" in lines[0] and "als_backend" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp / "out").exists()
