"""A study report's rows: how a table labels them and reads their accuracy; shared by the report and its plots."""

from __future__ import annotations

import math

from air_ft.methods import METHODS

__all__ = ["METHOD_NAMES", "headline_metric", "mean_accuracy", "mean_accuracy_se", "task_gap", "label", "columns",
           "fmt_ppl", "measurement_groups", "above_chance_share", "QUALIFYING_MARGIN"]

QUALIFYING_MARGIN = 0.10  # a task counts in the mean share where dense is at least this far above chance

METHOD_NAMES = {name: entry.label for name, entry in METHODS.items()}


def headline_metric(task: dict) -> str:
    """The accuracy a table shows for a task: ``acc_norm`` where lm-eval reports it (length-normalized, the
    convention for piqa, hellaswag, arc and openbookqa), else ``acc`` (winogrande, boolq); both are in the JSON."""
    return "acc_norm" if task.get("acc_norm") is not None else "acc"


def mean_accuracy(row: dict) -> float | None:
    vals = [t[headline_metric(t)] for t in row.get("tasks", {}).values()]
    return sum(vals) / len(vals) if vals else None


def mean_accuracy_se(row: dict) -> float | None:
    """Standard error of the mean accuracy over the tasks, the tasks taken as independent samples."""
    tasks = list(row.get("tasks", {}).values())
    if not tasks:
        return None
    return math.sqrt(sum((t.get(f"{headline_metric(t)}_stderr") or 0.0) ** 2 for t in tasks)) / len(tasks)


def task_gap(a: dict, b: dict) -> tuple[float, float]:
    """One task's headline accuracy of ``a`` minus ``b``, and the standard error of that difference (unpaired)."""
    k = headline_metric(a)
    return a[k] - b[k], math.hypot(a.get(f"{k}_stderr") or 0.0, b.get(f"{k}_stderr") or 0.0)


def above_chance_share(row: dict, dense: dict) -> dict | None:
    """The share of dense's above-chance accuracy ``row`` keeps, ``(acc - chance) / (dense - chance)``, per task
    (headline metric, lm-eval's chance recorded with the result) and its mean over the tasks on which dense is at
    least ``QUALIFYING_MARGIN`` above chance, each with a standard error (first order in both accuracies, the two
    rows' errors taken as independent; the mean's from its tasks' errors). None where no task qualifies.

    Returns ``{"tasks": {task: {"share", "se", "qualifies"}}, "mean", "mean_se", "qualifying": [task, ...]}``.
    """
    per_task = {}
    for t, res in row.get("tasks", {}).items():
        ref = dense.get("tasks", {}).get(t)
        chance = res.get("chance")
        if ref is None or chance is None or ref.get("chance") is None:
            continue
        k = headline_metric(res)
        gap = ref[k] - chance
        if gap <= 0:
            per_task[t] = {"share": None, "se": None, "qualifies": False}
            continue
        share = (res[k] - chance) / gap
        se = math.hypot(res.get(f"{k}_stderr") or 0.0, share * (ref.get(f"{k}_stderr") or 0.0)) / gap
        per_task[t] = {"share": share, "se": se, "qualifies": gap >= QUALIFYING_MARGIN}
    qualifying = [t for t, v in per_task.items() if v["qualifies"]]
    if not qualifying:
        return None
    mean = sum(per_task[t]["share"] for t in qualifying) / len(qualifying)
    mean_se = math.sqrt(sum(per_task[t]["se"] ** 2 for t in qualifying)) / len(qualifying)
    return {"tasks": per_task, "mean": mean, "mean_se": mean_se, "qualifying": qualifying}


def fmt_ppl(v: float) -> str:
    if not math.isfinite(v):
        return "inf"
    return f"{v:.3g}" if v >= 1e4 else f"{v:.2f}"


def label(row: dict) -> str:
    if row["method"] == "dense":
        return "dense"
    variant = f" ({row['variant']})" if row.get("variant") else ""
    return METHOD_NAMES.get(row["method"], row["method"]) + variant + (" + LoRA" if row.get("lora") else "")


def columns(report: dict) -> tuple[list[str], list[str], list[int]]:
    rows = report["rows"]
    texts = list(dict.fromkeys(t for r in rows for t in r.get("perplexity", {})))
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    batches = sorted({int(b) for r in rows if r.get("efficiency") for b in r["efficiency"]["decode_s_per_token"]})
    return texts, tasks, batches


def measurement_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows with the same layer shapes share one measurement (``measured_on``): ``(label, rows)`` per measurement,
    the label naming the methods that share it."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("efficiency"):
            groups.setdefault(r["efficiency"].get("measured_on", r["name"]), []).append(r)
    return [(", ".join(dict.fromkeys(label(g) for g in group)), group) for group in groups.values()]
