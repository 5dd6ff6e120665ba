"""Recipes: every shipped recipe loads; unknown keys list the valid ones; overrides apply; data sources."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from air_ft.config import CompressConfig, RecipeError, load_recipe
from air_ft.data import load_text, sample_windows

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(str(path))
    from air_ft.methods import METHODS

    assert recipe.compress.method in METHODS and not METHODS[recipe.compress.method].trains
    if "tiny" not in path.parts:  # tiny recipes get their model and text from overrides in tests
        assert recipe.data.calibration or getattr(recipe.train, "data", None), "every recipe names its text"
    assert recipe.output_dir


def _header_commands(path: Path) -> list[list[str]]:
    """The ``air-ft ...`` / ``accelerate launch ... -m air_ft ...`` commands in a recipe's header comment, as argv
    for air_ft's own parser (a line ending in a backslash continues on the next; a trailing ``# ...`` dropped)."""
    import shlex

    header, joined = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        joined = f"{joined} {text}".strip()
        if joined.endswith("\\"):
            joined = joined[:-1]
            continue
        header.append(joined)
        joined = ""
    commands = []
    for line in header:
        if not line.startswith(("air-ft ", "accelerate launch ")):
            continue  # prose
        words = shlex.split(line.split(" # ")[0])
        if words[:1] == ["air-ft"]:
            commands.append(words[1:])
        elif words[:2] == ["accelerate", "launch"] and "-m" in words:
            commands.append(words[words.index("-m") + 2:])
    return commands


@pytest.mark.parametrize("path", [p for p in RECIPES if not p.name.startswith("_")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_commands_in_every_recipe_header_parse_and_load(path):
    """The command a recipe's header shows is what a user copies: it must name the recipe, parse, and load."""
    from air_ft.cli import _parser

    commands = _header_commands(path)
    assert commands, f"{path.name} shows no air-ft command in its header"
    for argv in commands:
        args = _parser().parse_args(argv)
        if args.command in ("run", "compress", "train", "eval"):
            assert Path(ROOT / args.recipe).resolve() == path.resolve(), (argv, path)
            load_recipe(str(ROOT / args.recipe), args.overrides)


def test_a_recipe_inherits_its_base_and_overrides_what_it_sets(tmp_path):
    (tmp_path / "_base.yaml").write_text("model: {name_or_path: m, dtype: bfloat16}\n"
                                         "data: {calibration: [{source: a.txt}], evaluation: {t: {source: b.txt}}}\n")
    (tmp_path / "r.yaml").write_text("base: _base.yaml\nmodel: {dtype: float32}\n"
                                     "data: {calibration: [{source: c.txt}]}\n")
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    assert (recipe.model.name_or_path, recipe.model.dtype) == ("m", "float32")  # merged key by key
    assert recipe.data.calibration == [{"source": "c.txt"}]  # a list replaces the base's
    assert recipe.data.evaluation == {"t": {"source": "b.txt"}}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="its own base"):
        load_recipe(str(tmp_path / "loop.yaml"))
    # a list of bases merges in order, the recipe on top: the protocol from one file, the model from another
    (tmp_path / "_model.yaml").write_text("base: _base.yaml\nmodel: {name_or_path: q, dtype: float16}\n"
                                          "eval: {task_batch_size: 4}\n")
    (tmp_path / "_protocol.yaml").write_text("base: _base.yaml\nmodel: {device: cuda}\neval: {max_windows: 3}\n")
    (tmp_path / "both.yaml").write_text("base: [_protocol.yaml, _model.yaml]\neval: {max_windows: 5}\n")
    recipe = load_recipe(str(tmp_path / "both.yaml"))
    assert (recipe.model.name_or_path, recipe.model.dtype, recipe.model.device) == ("q", "float16", "cuda")
    assert (recipe.eval.task_batch_size, recipe.eval.max_windows) == (4, 5)
    assert recipe.data.evaluation == {"t": {"source": "b.txt"}}  # both bases share _base.yaml: not a cycle
    (tmp_path / "swapped.yaml").write_text("base: [_model.yaml, _protocol.yaml]\n")
    assert load_recipe(str(tmp_path / "swapped.yaml")).model.dtype == "bfloat16"  # the later base's _base wins
    for bad in ("[]", "[_base.yaml, 3]", "{a: 1}"):
        (tmp_path / "bad.yaml").write_text(f"base: {bad}\n")
        with pytest.raises(RecipeError, match="path of another recipe or a list of them"):
            load_recipe(str(tmp_path / "bad.yaml"))
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(tmp_path / "broken.yaml"))


def test_unknown_keys_list_valid_ones(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("compress:\n  retension: 0.5\n")
    with pytest.raises(RecipeError, match=r"compress.retension.*valid keys here.*compress.retention"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['colour'\]"):
        load_recipe(None, ["colour=red"])


def test_overrides_are_typed_and_validated():
    r = load_recipe(str(ROOT / "recipes/smollm2-135m/air-r60.yaml"),
                    ["compress.retention=0.4", "compress.include=[mlp]", "output_dir=x"])
    assert r.compress.retention == 0.4 and r.compress.include == ["mlp"] and r.output_dir == "x"
    with pytest.raises(RecipeError, match="strictly between 0 and 1"):
        load_recipe(None, ["compress.retention=1.2"])
    with pytest.raises(RecipeError, match="must look like"):
        load_recipe(None, ["compress.retention"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("nope.yaml")


@pytest.mark.parametrize("override,message", [
    ("compress.stats_memory_gb=0", "stats_memory_gb must be a positive number of GiB"),
    ("compress.stats_memory_gb=true", "stats_memory_gb must be a positive number of GiB"),
    ("compress.sequential=maybe", "sequential must be true or false"),
    ("compress.data_parallel=1", "data_parallel must be true or false"),
    ("compress.als_backend=cuda", "als_backend must be one of auto, native, triton, torch"),
    ("study.equal_tokens=maybe", "study.equal_tokens must be true or false, got 'maybe'"),
    ("eval.efficiency=1", "eval.efficiency must be true or false, got 1"),
])
def test_streaming_and_backend_options_are_checked(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_an_empty_method_list_is_the_dense_row_alone():
    assert load_recipe(None, ["study.methods=[]"]).study.methods == []
    with pytest.raises(RecipeError, match="an empty list only with study.dense: true"):
        load_recipe(None, ["study.methods=[]", "study.dense=false"])


@pytest.mark.parametrize("override, message", [
    ("study.methods=[air,svdllm,air]", "names a method twice"),
    ("study.retentions=[0.6,0.8,0.60]", "names a retention twice"),
])
def test_a_study_refuses_a_repeated_method_or_retention(override, message):
    """Two rows of one name would share one stage directory: refused when the recipe loads."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_defaults_are_valid():
    cfg = CompressConfig()
    assert cfg.method == "air2s" and cfg.delta > 0 and cfg.sweeps == 1


def test_the_default_method_presets_its_levers_and_the_published_methods_keep_theirs_off():
    from air_ft.config import result_fields

    levers = ("output_weight", "rank_allocation", "als_output_side", "refine_steps")
    default = CompressConfig().resolved()
    assert [getattr(default, n) for n in levers] == [0.5, "global", True, 16] and default.sequential
    for method in ("air", "svdllm"):  # as published: every lever off
        assert [getattr(CompressConfig(method=method).resolved(), n) for n in levers] == [0.0, "uniform", False, 0]
    # a lever the recipe sets wins over the preset, and a switched method is not left with the other's presets
    assert CompressConfig(output_weight=0.0, refine_steps=4).resolved().output_weight == 0.0
    assert dataclasses.replace(CompressConfig(), method="svdllm").resolved().rank_allocation == "uniform"
    # the published methods' keys hold no lever, set or unset (their finished stages stay reusable)
    assert result_fields(CompressConfig(method="air")) == result_fields(
        CompressConfig(method="air", output_weight=0.0, rank_allocation="uniform", refine_steps=0))
    assert not set(levers) & set(result_fields(CompressConfig(method="air")))
    # refinement streams sequentially: the default refines only then; asked for without it, it is refused
    assert CompressConfig(sequential=False).resolved().refine_steps == 0
    with pytest.raises(RecipeError, match="refine_steps needs sequential: true"):
        CompressConfig(sequential=False, refine_steps=16)


def test_text_slices_do_not_overlap(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 10)
    head, tail = load_text(str(f), 0.0, 0.8), load_text(str(f), 0.8, 1.0)
    assert head + tail == "abcdefghij" * 10 and len(tail) == 20
    (tmp_path / "a_x.txt").write_text("A")
    (tmp_path / "b_x.txt").write_text("B")
    assert load_text(str(tmp_path / "*_x.txt")) == "AB"
    with pytest.raises(FileNotFoundError, match="neither a file nor a known dataset"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        load_text(str(f), 0.5, 0.2)


def test_named_datasets_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["first doc", "", "second doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_text("wikitext2", split="test") == "first doc\n\nsecond doc"
    assert calls[0][0] == ("wikitext", "wikitext-2-raw-v1")
    load_text("c4", split="validation", max_docs=1)
    assert calls[1][0] == ("allenai/c4",) and "validation" in calls[1][1]["data_files"]


def test_calibration_windows_are_seeded_and_balanced(tokenizer, text):
    a = sample_windows(tokenizer, [text[:5000], text[5000:]], 6, 20, seed=3)
    b = sample_windows(tokenizer, [text[:5000], text[5000:]], 6, 20, seed=3)
    c = sample_windows(tokenizer, [text[:5000], text[5000:]], 6, 20, seed=4)
    assert a.shape == (6, 20) and a.equal(b) and not a.equal(c)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_windows(tokenizer, ["the king"], 2, 50, seed=0)


def test_drop_lines_and_source_keys_are_checked(tmp_path):
    f = tmp_path / "scan.txt"
    f.write_text("### START: page 1 ###\np.772:0\nreal text line\n#### Source: scan\nmore text\n")
    assert load_text(str(f), drop_lines=r"^(#{2,4} |p\.\d+:\d+\s*$)") == "real text line\nmore text\n"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        load_text(str(f), drop_lines="(")
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['colour'\] in data.calibration\[0\]"):
        load_recipe(None, ["data.calibration=[{source: a.txt, colour: red}]"])
    with pytest.raises(RecipeError, match="with a 'source' key"):
        load_recipe(None, ["data.evaluation={heldout: {start: 0.5}}"])


def test_the_recipe_reference_page_is_generated_from_the_config(capsys):
    """docs/recipe.md is `air-ft options`: every field once, with its default and whether it keys a stage."""
    import dataclasses

    from air_ft.cli import main
    from air_ft.config import Recipe, describe

    page = describe()
    assert (ROOT / "docs" / "recipe.md").read_text() == page + "\n", "regenerate docs/recipe.md (air-ft options)"
    for section in dataclasses.fields(Recipe):
        value = getattr(Recipe(), section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                assert page.count(f"| `{section.name}.{f.name}` |") == 1, f"{section.name}.{f.name}"
    assert "| `compress.progress` | `true` | no |" in page and "| `compress.delta` | `2.0` | yes |" in page
    assert "| `eval.decode_batch_sizes` | `[1, 16]` | efficiency |" in page
    assert main(["options", "lora"]) == 0
    out = capsys.readouterr().out
    assert "`lora.rank`" in out and "`train.max_steps`" not in out


def test_the_acip_reference_recipe_runs_the_reference_schedule_at_equal_tokens():
    """recipes/smollm2-135m/acip_reference.yaml: every acip field at its default (the reference code's schedule,
    study.yaml's reduced one undone), a LoRA budget that holds the reference's mask phase and post-tune, and a
    plan with every method at every retention, with and without LoRA."""
    from air_ft.config import AcipConfig
    from air_ft.pipeline import plan

    recipe = load_recipe(str(ROOT / "recipes" / "smollm2-135m" / "acip_reference.yaml"))
    assert recipe.acip == AcipConfig()
    reference_tokens = (2000 + recipe.acip.post_tune_steps) * recipe.acip.batch_size * recipe.acip.seq_len
    assert recipe.train.max_steps * recipe.train.step_tokens() > reference_tokens
    evals = [s.name for s in plan(recipe) if s.kind == "eval"]
    assert len(evals) == 1 + 3 * 3 * 2 and "acip-r0.40+lora" in evals
