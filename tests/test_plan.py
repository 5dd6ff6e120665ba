"""The study as data: the plan of a recipe, inspected without loading a model, and the cache keys it carries."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from air_ft.config import Recipe, load_recipe, result_fields
from air_ft.errors import RecipeError
from air_ft.methods import METHODS
from air_ft.pipeline.cache import StageDir
from air_ft.pipeline.plan import KINDS, check_study, lora_budget, plan

ROOT = Path(__file__).resolve().parents[1]

GRID = ["study.methods=[svdllm, air, acip]", "study.retentions=[0.8, 0.6]", "study.lora=[air, acip]",
        "output_dir=/tmp/x", "acip.post_tune_steps=2", "train.max_steps=100"]


def _plan(*overrides: str):
    return plan(load_recipe(None, [*GRID, *overrides]))


def _keys(stages) -> dict[str, str]:
    return {s.id: s.key for s in stages}


def test_the_plan_lists_every_row_in_order_with_its_inputs():
    stages = _plan()
    assert [s.id for s in stages] == [
        "eval/dense",
        "compress/svdllm-r0.80", "eval/svdllm-r0.80",
        "compress/air-r0.80", "eval/air-r0.80", "train/air-r0.80", "eval/air-r0.80+lora",
        "compress/acip-r0.80", "eval/acip-r0.80", "train/acip-r0.80", "eval/acip-r0.80+lora",
        "compress/svdllm-r0.60", "eval/svdllm-r0.60",
        "compress/air-r0.60", "eval/air-r0.60", "train/air-r0.60", "eval/air-r0.60+lora",
        "compress/acip-r0.60", "eval/acip-r0.60", "train/acip-r0.60", "eval/acip-r0.60+lora",
        "efficiency/efficiency", "report/report"]
    by_id = {s.id: s for s in stages}
    seen: set[str] = set()
    for s in stages:  # every stage runs after the stages it reads
        assert s.kind in KINDS and set(s.inputs) <= seen, s.id
        seen.add(s.id)
    assert by_id["eval/air-r0.60+lora"].inputs == ("train/air-r0.60",)
    assert by_id["train/air-r0.60"].inputs == ("compress/air-r0.60",)
    assert by_id["eval/dense"].inputs == ()
    assert str(by_id["train/air-r0.60"].path) == "/tmp/x/stages/train/air-r0.60"
    assert by_id["compress/acip-r0.60"].recipe.compress.method == "acip"
    assert by_id["compress/acip-r0.60"].recipe.compress.retention == 0.6
    row = by_id["eval/acip-r0.80+lora"].row
    assert (row.name, row.method, row.retention, row.lora) == ("acip-r0.80+lora", "acip", 0.8, True)
    # one-shot compression and training run on every process; a method that trains compresses on the main one
    assert by_id["compress/air-r0.60"].all_ranks and not by_id["compress/acip-r0.60"].all_ranks
    assert by_id["train/air-r0.60"].all_ranks and not by_id["eval/air-r0.60"].all_ranks
    assert len({s.key for s in stages}) == len(stages)


def test_a_changed_field_rekeys_its_stage_and_everything_downstream_and_nothing_else():
    base = _keys(_plan())

    def changed(*overrides: str) -> set[str]:
        new = _keys(_plan(*overrides))
        return {i for i in base if new[i] != base[i]}

    # a compression setting: every compressed model, what trains on it and what evaluates it
    assert changed("compress.delta=0.5") == {i for i in base if not i.startswith("eval/dense")}
    # an evaluation setting: evaluations, the speed measurement and the report; no compression, no training
    assert changed("eval.max_windows=3") == {i for i in base if i.split("/")[0] in ("eval", "efficiency", "report")}
    # a training setting: the trainings, their evaluations, the measurement keyed by them and the report
    assert changed("train.learning_rate=0.1") == {
        "train/air-r0.80", "eval/air-r0.80+lora", "train/acip-r0.80", "eval/acip-r0.80+lora",
        "train/air-r0.60", "eval/air-r0.60+lora", "train/acip-r0.60", "eval/acip-r0.60+lora",
        "efficiency/efficiency", "report/report"}
    # a method's revision keys its rows only (its code changed what it makes for the same settings)
    import air_ft.methods as methods

    real = methods.METHODS["acip"]
    methods.METHODS["acip"] = dataclasses.replace(real, revision=real.revision + 1)
    try:
        bumped = {i for i, k in _keys(_plan()).items() if k != base[i]}
    finally:
        methods.METHODS["acip"] = real
    assert bumped and all("acip" in i or i.split("/")[0] in ("efficiency", "report") for i in bumped)
    # ACIP's own settings key its compression (they change what it produces), nobody else's
    assert {i.split("/")[1].split("+")[0] for i in changed("acip.lambda_growth=1.05")} >= {"acip-r0.80"}
    assert not any("air-" in i or "svdllm" in i for i in changed("acip.lambda_growth=1.05"))
    # speed settings key the measurement (and the report) only
    assert changed("eval.efficiency_rounds=5") == {"efficiency/efficiency", "report/report"}
    # how the work is done changes no result
    for how in ("compress.progress=false", "compress.cache=false", "compress.stats_memory_gb=1",
                "train.progress=false", "train.save_steps=7", "train.resume=false"):
        assert changed(how) == set(), how


def test_every_recipe_field_says_whether_it_keys_a_stage():
    """A field declared without air_ft.config._f would key nothing by mistake (or everything): each one says."""
    for section in dataclasses.fields(Recipe):
        cls = section.type if isinstance(section.type, type) else type(getattr(Recipe(), section.name))
        if not dataclasses.is_dataclass(cls):
            assert set(section.metadata) >= {"help", "keys"}, section.name
            continue
        for f in dataclasses.fields(cls):
            assert isinstance(f.metadata.get("keys"), bool) and f.metadata.get("help"), f"{section.name}.{f.name}"
            assert f.metadata.get("stage") in (None, *KINDS), f"{section.name}.{f.name}"
    # the classification reaches the keys: an execution-only field is absent, a result field present
    fields = result_fields(Recipe().compress)
    assert "delta" in fields and "progress" not in fields and "cache" not in fields
    assert set(result_fields(Recipe().eval, "efficiency")) == {"decode_batch_sizes", "efficiency_rounds"}
    # a field added later keys only off its neutral value (the earlier result), a lever's settings only while it is on
    levers = {"output_weight", "rank_allocation", "rank_floor", "rank_ceiling", "refine_steps", "refine_lr",
              "als_output_side", "refine_loss"}
    air = dataclasses.replace(Recipe().compress, method="air")  # as published: every lever off
    assert not levers & set(result_fields(air))
    assert result_fields(dataclasses.replace(air, output_weight=0.5))["output_weight"] == 0.5
    on = result_fields(dataclasses.replace(air, rank_allocation="global", refine_steps=8, als_output_side=True))
    assert levers - {"output_weight", "refine_loss"} <= set(on)  # refine_loss keys off its old value only
    token = result_fields(dataclasses.replace(air, sequential=True, refine_steps=8, refine_loss="token"))
    assert token["refine_loss"] == "token"
    assert "refine_loss" not in result_fields(dataclasses.replace(air, refine_loss="token"))  # refinement off
    assert "refine_lr_scale" not in token  # keys off its old value only: every earlier refined row stays valid
    rms = result_fields(dataclasses.replace(air, sequential=True, refine_steps=8, refine_lr_scale="rms"))
    assert rms["refine_lr_scale"] == "rms"
    base = _keys(_plan())
    again = _keys(_plan("compress.output_weight=0.5"))
    changed = {i for i in base if base[i] != again[i]}  # the whitened methods' rows; not dense, not ACIP-style's
    assert changed == {i for i in base if "svdllm" in i or "air" in i} | {"efficiency/efficiency", "report/report"}
    assert set(result_fields(Recipe().eval, "serve")) == {"serve_batch_sizes", "serve_tokens", "serve_prompt_len",
                                                          "serve_tensor_parallel", "serve_rounds", "serve_engine"}


def test_serving_is_one_stage_over_every_row_keyed_by_its_own_settings():
    base = {s.id: s for s in _plan("eval.serve=true")}
    assert "serve/serve" not in _keys(_plan())
    serve = base["serve/serve"]
    assert serve.inputs == tuple(i for i in base if i.startswith("eval/"))
    assert "serve/serve" in base["report/report"].inputs
    again = _keys(_plan("eval.serve=true", "eval.serve_rounds=5"))
    assert {i for i in base if base[i].key != again[i]} == {"serve/serve", "report/report"}
    again = _keys(_plan("eval.serve=true", "compress.delta=0.5"))  # another checkpoint serves differently
    assert again["serve/serve"] != serve.key


def test_a_study_that_serves_without_vllm_is_refused_before_any_work(monkeypatch):
    import importlib.util

    from air_ft.serving import ServeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ServeError, match="eval.serve=false"):
        check_study(load_recipe(None, [*GRID, "eval.serve=true"]))


def test_methods_are_entries_that_the_config_and_the_plan_read():
    assert tuple(METHODS) == ("svd", "asvd", "fwsvd", "svdllm", "air", "air2s", "acip")
    assert [m for m in METHODS.values() if m.trains] == [METHODS["acip"]]
    assert all((m.factor is None) == m.trains for m in METHODS.values())
    assert not METHODS["svd"].calibrates and METHODS["air"].whitened and METHODS["asvd"].needs_gram
    # AIR needs a backward only when its influence is on; the default also for its output side
    cfg = dataclasses.replace(Recipe().compress, method="air")
    assert METHODS["air"].influence(cfg) == cfg.influence
    assert METHODS["air"].influence(dataclasses.replace(cfg, delta=0.0)) is None
    assert METHODS["air2s"].influence(dataclasses.replace(cfg, method="air2s", delta=0.0)) == "ograd"
    with pytest.raises(RecipeError, match="choose one of"):
        load_recipe(None, ["compress.method=nope"])


def test_the_lora_budget_of_a_method_that_trained_while_compressing():
    recipe = load_recipe(None, [*GRID, "train.batch_size=2", "train.seq_len=8"])  # 16 tokens a step
    assert lora_budget(recipe, 0, "air").max_steps == 100
    assert lora_budget(recipe, 16 * 30 + 5, "acip").max_steps == 69  # whole steps left of 1,600 tokens
    assert lora_budget(dataclasses.replace(recipe, study=dataclasses.replace(recipe.study, equal_tokens=False)),
                       16 * 30, "acip").max_steps == 100
    with pytest.raises(RecipeError, match="whole LoRA budget"):
        lora_budget(recipe, 16 * 100, "acip")


def test_a_study_is_refused_before_any_model_loads():
    with pytest.raises(RecipeError, match="nothing to evaluate"):
        check_study(load_recipe(None, GRID))
    ok = [*GRID, "data.evaluation={t: {source: x.txt}}", "data.calibration=[{source: x.txt}]"]
    with pytest.raises(RecipeError, match="acip.stop_retention"):
        check_study(load_recipe(None, [*ok, "study.retentions=[0.3]"]))
    with pytest.raises(RecipeError, match="post-tune alone"):
        check_study(load_recipe(None, [*ok, "acip.post_tune_steps=5000"]))
    with pytest.raises(RecipeError, match="data.calibration is empty"):
        check_study(load_recipe(None, [*GRID, "data.evaluation={t: {source: x.txt}}"]))


def test_variants_make_one_row_per_setting_and_key_only_their_own_stages():
    plain = _keys(plan(load_recipe(None, ["study.methods=[svdllm, air]", "study.lora=[air]"])))
    grid = ["study.methods=[svdllm, air]", "study.lora=[air]",
            "study.variants={seq: {}, dense-stats: {sequential: false, delta: 1.0}}"]
    stages = plan(load_recipe(None, grid))
    ids = [s.id for s in stages]
    assert "compress/air-r0.60-dense-stats" in ids and "eval/air-r0.60-seq+lora" in ids
    by_id = {s.id: s for s in stages}
    rec = by_id["compress/air-r0.60-dense-stats"].recipe.compress
    assert (rec.sequential, rec.delta, rec.method) == (False, 1.0, "air")
    assert by_id["eval/air-r0.60-dense-stats+lora"].row.variant == "dense-stats"
    # an empty variant is the compress section as it is: the same compression as the study without variants
    assert by_id["compress/air-r0.60-seq"].key == plain["compress/air-r0.60"]
    assert by_id["compress/air-r0.60-dense-stats"].key != plain["compress/air-r0.60"]
    # the output side weights whitened coordinates, which plain SVD has not: one SVD row, not two equal ones
    lever = plan(load_recipe(None, ["study.methods=[svd, svdllm]", "study.lora=false", "study.retentions=[0.6]",
                                    "study.variants={input: {}, output: {output_weight: 0.5}}"]))
    assert sorted(s.id for s in lever if s.kind == "compress") == [
        "compress/svd-r0.60-input", "compress/svdllm-r0.60-input", "compress/svdllm-r0.60-output"]
    # a variant limited to some methods makes rows of those only
    only = plan(load_recipe(None, ["study.methods=[svdllm, air]", "study.lora=false", "study.retentions=[0.6]",
                                   "study.variants={a: {}, b: {delta: 1.0, methods: [air]}}"]))
    assert sorted(s.id for s in only if s.kind == "compress") == [
        "compress/air-r0.60-a", "compress/air-r0.60-b", "compress/svdllm-r0.60-a"]
    assert next(s for s in only if s.id == "compress/air-r0.60-b").recipe.compress.delta == 1.0
    for bad, message in (("study.variants={x: {retention: 0.5}}", "grid's own axes"),
                         ("study.variants={x: {methods: [svd]}}", "must be a list of study.methods"),
                         ("study.variants={x: {sequential: maybe}}", "true or false"),
                         ("study.variants={x: {train: {bogus: 1}}}", r"x.train sets \['bogus'\], which are not"),
                         ("study.variants={x: {lora: 8}}", "x.lora must map lora settings to values"),
                         ("study.variants={x: {lora: {placement: everywhere}}}", "placement")):
        with pytest.raises(RecipeError, match=message):
            plan(load_recipe(None, [bad]))


def test_variants_of_the_training_share_the_compression_and_key_their_own_recovery():
    """A variant that sets only train / lora settings is the same compression (one stage) recovered its own way; one
    that sets acip settings is a compression of its own (ACIP-style trains while compressing)."""
    grid = ["study.methods=[air, acip]", "study.lora=true", "study.retentions=[0.6]",
            "study.variants={base: {}, fast: {train: {learning_rate: 0.003}}, layer: {lora: {placement: layer}}, "
            "masks: {acip: {mask_lr: 0.001}, methods: [acip]}, same: {train: {save_steps: 16}, methods: [air]}}"]
    stages = plan(load_recipe(None, grid))
    by_id = {s.id: s for s in stages}
    air_train = sorted(s.id for s in stages if s.kind == "train" and s.name.startswith("air-"))
    assert [s.id for s in stages if s.kind == "compress" and s.name.startswith("air-")] == ["compress/air-r0.60-base"]
    assert air_train == ["train/air-r0.60-base", "train/air-r0.60-fast", "train/air-r0.60-layer"]
    assert all(by_id[t].inputs == ("compress/air-r0.60-base",) for t in air_train)
    assert len({by_id[t].key for t in air_train}) == 3
    assert by_id["train/air-r0.60-fast"].recipe.train.learning_rate == 0.003
    assert by_id["train/air-r0.60-layer"].recipe.lora.placement == "layer"
    assert "eval/air-r0.60-fast+lora" in by_id and "eval/air-r0.60-fast" not in by_id  # no duplicate compressed row
    # save_steps changes how training is done, not its result: the same recovered row as base, not a new one
    assert "train/air-r0.60-same" not in by_id
    acip = sorted(s.id for s in stages if s.kind == "compress" and s.name.startswith("acip-"))
    assert acip == ["compress/acip-r0.60-base", "compress/acip-r0.60-masks"]
    assert by_id["compress/acip-r0.60-masks"].recipe.acip.mask_lr == 0.001


# Committed stages that a deliberate change made stale, with the reason; each entry goes once its rows are rerun.
PENDING: dict = {}  # study -> (stage kinds, row prefix, stage id, why): committed rows known to await a rerun


@pytest.mark.parametrize("recipe,study,overrides", [
    ("study.yaml", "study_smollm2", ["study.methods=[svdllm,air,air2s,acip]"]),
    ("sequential.yaml", "sequential_smollm2", []),
    ("serve.yaml", "serve_smollm2_cpu", []),
    ("levers.yaml", "levers_smollm2", []),
    ("levers.yaml", "levers_refine_smollm2", []),
])
def test_every_committed_stage_is_reused_under_todays_keys(recipe, study, overrides):
    """A committed study's finished stages hold the keys today's plan gives them: a rerun of its command redoes
    nothing, and a new recipe field or a key change that would silently redo (or misuse) them fails here."""
    out = ROOT / "benchmarks" / "results" / study
    stages = plan(load_recipe(ROOT / "recipes" / "smollm2-135m" / recipe, [f"output_dir={out}", *overrides]))
    by_path = {s.path: s for s in stages}
    markers = sorted((out / "stages").rglob("stage.json"))
    assert markers
    stale = {by_path[m.parent].id for m in markers
             if StageDir(by_path[m.parent].path, by_path[m.parent].key).cached() is None}
    kinds, prefix, also, _ = PENDING.get(study, (set(), None, None, ""))
    pending = {by_path[m.parent].id for m in markers if by_path[m.parent].id == also or (
        prefix and by_path[m.parent].kind in kinds and by_path[m.parent].name.startswith(prefix))}
    assert stale == pending  # nothing else is stale, and a pending row that was rerun leaves this list
