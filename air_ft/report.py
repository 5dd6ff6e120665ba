"""The study report: ``report.json`` (every figure, the recipe, versions, provenance), ``report.md`` (one table to
read at a glance, then the setup and notes) and PNG plots, rendered from the JSON alone (``air-ft report DIR``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from air_ft.errors import AssetError
from air_ft.files import write_text
from air_ft.plots import plot
from air_ft.rows import METHOD_NAMES, QUALIFYING_MARGIN, above_chance_share, headline_metric
from air_ft.rows import columns as _columns
from air_ft.rows import fmt_ppl as _fmt_ppl
from air_ft.rows import label as _label
from air_ft.rows import mean_accuracy as _mean_accuracy
from air_ft.rows import mean_accuracy_se as _mean_accuracy_se
from air_ft.rows import measurement_groups as _measurement_groups
from air_ft.rows import task_gap as _task_gap

__all__ = ["write_report", "render_report", "headline_metric", "head_to_head", "above_chance", "markdown",
           "METHOD_NAMES"]

def focal_method(report: dict) -> str:
    """The method a report sets against the others: the library's default (``air2s``) where the study has its rows,
    else AIR (the reports of studies that predate the default)."""
    from air_ft.config import CompressConfig

    default = CompressConfig().method
    return default if any(r["method"] == default for r in report["rows"]) else "air"


def head_to_head(report: dict, method: str | None = None) -> list[dict]:
    """``method`` (default :func:`focal_method`) against every other compressed method at the same retention (and
    variant), without and with LoRA: the perplexity change (%) per text, the mean-accuracy difference with its
    (unpaired) standard error, each task's difference in standard errors, and both rows' training tokens."""
    method = method or focal_method(report)
    rows = [r for r in report["rows"] if r["method"] != "dense"]
    out = []
    for a in (r for r in rows if r["method"] == method):
        for b in rows:
            if (b["method"] == method or b["retention"] != a["retention"] or bool(b.get("lora")) != bool(a.get("lora"))
                    or b.get("variant") != a.get("variant")):  # like against like: one variant's settings
                continue
            ppl = {t: 100 * (a["perplexity"][t]["ppl"] / v["ppl"] - 1) for t, v in b.get("perplexity", {}).items()
                   if t in a.get("perplexity", {})}
            entry = {"retention": a["retention"], "lora": bool(a.get("lora")), "row": a["name"], "against": b["name"],
                     "ppl_change_pct": ppl, "tokens": {a["name"]: a.get("tokens"), b["name"]: b.get("tokens")}}
            ma, mb = _mean_accuracy(a), _mean_accuracy(b)
            if ma is not None and mb is not None:
                entry["mean_acc_diff"] = ma - mb
                entry["mean_acc_diff_se"] = math.hypot(_mean_accuracy_se(a), _mean_accuracy_se(b))
                gaps = {t: _task_gap(ra, b["tasks"][t]) for t, ra in a["tasks"].items() if t in b["tasks"]}
                entry["task_diff_in_se"] = {t: diff / se if se else None for t, (diff, se) in gaps.items()}
            out.append(entry)
    return out


def _head_to_head_lines(report: dict) -> list[str]:
    pairs = head_to_head(report)
    if not pairs:
        return []
    rows = {r["name"]: r for r in report["rows"]}
    name = METHOD_NAMES.get(focal_method(report), "AIR")
    lines = [f"## {name} against each method", "",
             f"At equal retention, without and with LoRA. Perplexity: {name}'s change against the other row "
             f"(negative: {name} is better). Mean accuracy: {name} minus the other row, in points, +- one standard "
             f"error (the tasks' standard errors combined, the two rows taken as independent). Train tokens: "
             f"{name}'s / the other row's (ACIP-style spends its mask phase and post-tune from the same budget).", "",
             f"| retention | {name} row | against | " + " | ".join(f"ppl {t}" for t in pairs[0]["ppl_change_pct"])
             + " | mean acc (points) | largest task gap (SE) | train tokens |",
             "|" + "---|" * (6 + len(pairs[0]["ppl_change_pct"]))]
    for p in pairs:
        a, b = rows[p["row"]], rows[p["against"]]
        acc = (f"{100 * p['mean_acc_diff']:+.1f} +- {100 * p['mean_acc_diff_se']:.1f}"
               if "mean_acc_diff" in p else "")
        gaps = [v for v in p.get("task_diff_in_se", {}).values() if v is not None]
        gap = f"{max(gaps, key=abs):+.2f}" if gaps else ""
        tok = "/".join(f"{(r.get('tokens') or {}).get('training', 0):,}" for r in (a, b))
        lines.append(f"| {p['retention']:.2f} | {_label(a)} | {_label(b)} | "
                     + " | ".join(f"{v:+.1f} %" for v in p["ppl_change_pct"].values())
                     + f" | {acc} | {gap} | {tok} |")
    return lines + [""]


def _model_params(row: dict) -> int | None:
    """The whole model's parameters: measured with speed, else counted at evaluation, else (a row without
    training, from a stage evaluated before the count was recorded) the compressed model's count."""
    eff = (row.get("efficiency") or {}).get("params", {}).get("model")
    if eff or row.get("params"):
        return eff or row["params"]
    return None if row.get("lora") else (row.get("compress") or {}).get("model_params_after")


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def markdown(report: dict) -> str:
    """``report.md``: the table first (best value per column in bold), then setup, significance and notes."""
    rows = report["rows"]
    texts, tasks, batches = _columns(report)
    header = ["model", "retention"] + [f"ppl {t}" for t in texts] + [f"{t} ({headline_metric(_first(rows, t))})"
                                                                       for t in tasks]
    header += ["mean acc"] if tasks else []
    trained = any((r.get("tokens") or {}).get("training") for r in rows)
    header += ["params"] + (["train tokens"] if trained else []) + [f"decode b{b} (ms/tok)" for b in batches]
    cells, values = [], []  # values: (number, lower_is_better) per column for the bold marks
    for r in rows:
        line, nums = [_label(r), "1.00" if r["method"] == "dense" else f"{r['retention']:.2f}"], [None, None]
        for t in texts:
            v = r["perplexity"].get(t, {}).get("ppl")
            line.append(_fmt_ppl(v) if v is not None else "")
            nums.append((v, True) if v is not None else None)
        for t in tasks:
            res = r.get("tasks", {}).get(t)
            v = res[headline_metric(res)] if res else None
            line.append(f"{100 * v:.1f}" if v is not None else "")
            nums.append((v, False) if v is not None else None)
        if tasks:
            m = _mean_accuracy(r)
            line.append(f"{100 * m:.1f}" if m is not None else "")
            nums.append((m, False) if m is not None else None)
        eff = r.get("efficiency") or {}
        params = _model_params(r)
        line.append(_fmt_params(params) if params else "")
        nums.append(None)
        if trained:
            t = (r.get("tokens") or {}).get("training", 0)
            line.append(f"{t:,}")
            nums.append(None)
        for b in batches:
            s = (eff.get("decode_s_per_token") or {}).get(str(b))
            line.append(f"{s * 1e3:.1f}" if s is not None else "")
            nums.append((s, True) if s is not None else None)
        cells.append(line)
        values.append(nums)
    for col in range(len(header)):
        candidates = [(v[col][0], i) for i, v in enumerate(values)
                      if v[col] is not None and v[col][0] is not None and math.isfinite(v[col][0])]
        if not candidates:
            continue
        lower = next(v[col][1] for v in values if v[col] is not None)
        best = (min if lower else max)(candidates)[0]
        for val, i in candidates:
            if val == best:
                cells[i][col] = f"**{cells[i][col]}**"
    out = [f"# {report.get('title', 'air_ft study')}", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    out += ["", "Perplexity: lower is better; accuracy (%) and decode latency as marked; best per column in bold. "
                "Retention counts the parameters of the compressed decoder linear layers only; params is the whole "
                "model.", ""]
    out += _setup_lines(report) + _head_to_head_lines(report) + _significance_lines(report, tasks)
    out += _share_lines(report, tasks) + _task_lines(report, tasks)
    out += _efficiency_lines(report)
    out += _serve_lines(report)
    plots = [p for p in ("perplexity.png", "accuracy.png", "train_loss.png", "efficiency.png")
             if p in report.get("plots", [])]
    if plots:
        out += ["## Plots", ""] + [f"![{p[:-4]}](plots/{p})" for p in plots] + [""]
    return "\n".join(out) + "\n"


def _first(rows: list[dict], task: str) -> dict:
    return next(r["tasks"][task] for r in rows if task in r.get("tasks", {}))


def _setup_lines(report: dict) -> list[str]:
    s, env = report.get("setup", {}), report.get("environment", {})
    lines = ["## Setup", ""]
    for key, label in (("model", "Model"), ("calibration", "Calibration"), ("lora", "LoRA recovery"),
                       ("perplexity", "Perplexity"), ("retention_counts", "Retention")):
        if s.get(key):
            lines.append(f"- {label}: {s[key]} ({s['dtype']} on {s['device']})" if key == "model"
                         else f"- {label}: {s[key]}")
    if s.get("tasks"):
        lines.append(f"- Zero-shot tasks (lm-eval {env.get('lm-eval')}): {', '.join(s['tasks'])}; "
                     + (f"{s['task_limit']} documents each, a seeded evenly spread subset (seed {s['seed']})"
                        if s.get("task_limit") else "the whole split"))
    if s.get("calibration_tokens"):
        lines.append(f"- Token budgets: calibration {s['calibration_tokens']:,} tokens per method; "
                     f"LoRA {s.get('lora_train_tokens', 0):,} training tokens per recovered row"
                     + (" in all (a method that trained while compressing, such as ACIP-style, gets that many fewer "
                        "LoRA steps; the train tokens column has each row's total)"
                        if s.get("equal_tokens") and s.get("lora_train_tokens") else ""))
    shares = [(r, r["compress"]["lora_share"]) for r in report["rows"]
              if not r.get("lora") and (r.get("compress") or {}).get("lora_share") is not None]
    if shares:
        lines.append("- ACIP-style size: the parameters the materialized model has, its merged LoRA included (the "
                     "reference counts the factorized layers without LoRA), so its rows have every other row's "
                     "parameters at their retention; the merged LoRA's share of the factored layers: "
                     + ", ".join(f"{share:.1%} at {r['retention']:.2f}" for r, share in shares))
    lines.append("- Versions: " + ", ".join(f"{k} {env[k]}" for k in ("air_ft", "torch", "transformers", "peft",
                                                                        "trl", "lm-eval") if env.get(k))
                 + (f"; commit {_short(env['git_commit'])}" if env.get("git_commit") else ""))
    return lines + [""]


def _significance_lines(report: dict, tasks: list[str]) -> list[str]:
    """Which accuracy differences between rows of equal retention exceed two standard errors."""
    if not tasks:
        return []
    rows = report["rows"]
    lines = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["method"] == "dense" or a["retention"] != b["retention"] or a.get("lora") != b.get("lora"):
                continue
            for t in tasks:
                ra, rb = a.get("tasks", {}).get(t), b.get("tasks", {}).get(t)
                if not ra or not rb:
                    continue
                k = headline_metric(ra)
                diff, se = _task_gap(rb, ra)
                if se > 0 and abs(diff) > 2 * se:
                    lines.append(f"- {t} at {a['retention']:.2f}: {_label(b)} {100 * rb[k]:.1f} vs {_label(a)} "
                                 f"{100 * ra[k]:.1f} ({100 * diff:+.1f} points, 2 SE = {200 * se:.1f})")
    head = ["## Differences larger than two standard errors", ""]
    if not lines:
        return head + ["- none between methods at equal retention (see report.json for every standard error)", ""]
    return head + lines + [""]


def above_chance(report: dict) -> dict:
    """Per compressed row, the share of dense's above-chance accuracy it keeps (``rows.above_chance_share``); empty
    without a dense row or without the tasks' chance levels."""
    dense = next((r for r in report["rows"] if r["method"] == "dense"), None)
    if dense is None:
        return {}
    shares = {r["name"]: above_chance_share(r, dense) for r in report["rows"] if r["method"] != "dense"}
    return {name: s for name, s in shares.items() if s is not None}


def _share_lines(report: dict, tasks: list[str]) -> list[str]:
    shares = above_chance(report)
    if not shares:
        return []
    dense = next(r for r in report["rows"] if r["method"] == "dense")
    qualifying = next(iter(shares.values()))["qualifying"]
    head = ["## Share of dense's above-chance accuracy", "",
            f"(acc - chance) / (dense - chance) per task, chance being a uniform guess over each document's choices; "
            f"the mean is over the tasks on which dense is at least {100 * QUALIFYING_MARGIN:.0f} points above "
            f"chance ({', '.join(qualifying)}), ± one standard error (both rows' errors, taken as independent).", "",
            "| model | retention | " + " | ".join(f"{t}{'' if t in qualifying else ' (not counted)'}" for t in tasks)
            + " | mean share |", "|---|---|" + "---|" * len(tasks) + "---|",
            "| dense (points above chance) | 1.00 | " + " | ".join(
                f"{100 * (dense['tasks'][t][headline_metric(dense['tasks'][t])] - dense['tasks'][t]['chance']):+.1f}"
                if t in dense.get("tasks", {}) and dense["tasks"][t].get("chance") is not None else ""
                for t in tasks) + " | |"]
    rows = {r["name"]: r for r in report["rows"]}
    for name, s in shares.items():
        cells = [f"{s['tasks'][t]['share']:.2f} ± {s['tasks'][t]['se']:.2f}"
                 if s["tasks"].get(t, {}).get("share") is not None else "" for t in tasks]
        head.append(f"| {_label(rows[name])} | {rows[name]['retention']:.2f} | " + " | ".join(cells)
                    + f" | {s['mean']:.2f} ± {s['mean_se']:.2f} |")
    return head + [""]


def _task_lines(report: dict, tasks: list[str]) -> list[str]:
    prov = report.get("provenance", {}).get("tasks", {})
    if not tasks:
        return []
    lines = ["## Tasks", ""]
    for t in tasks:
        p = prov.get(t, {})
        note = "" if p.get("split") == p.get("papers_split") else f" (the papers score {p.get('papers_split')})"
        lines.append(f"- {t}: {p.get('n')} of {p.get('of')} documents of the {p.get('split')} split{note}; "
                     f"source {p.get('source')}")
    return lines + [""]


def _efficiency_lines(report: dict) -> list[str]:
    rows = [r for r in report["rows"] if r.get("efficiency")]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if not dense or len(rows) < 2:
        return []
    d = dense["efficiency"]
    lines = ["## Speed and memory against dense", "",
             f"Measured on {d['device']} ({d['dtype']}, {d['threads']} threads)"
             + (f", every model in turns in one process, {d['rounds']} rounds, medians (ranges in report.json)"
                if d.get("rounds") else "")
             + "; ratios to dense, below 1 is faster / smaller (prefill: above 1 is faster). Decode: seconds per "
               "token with the KV cache.", "",
             "| model | retention | FLOPs/token | checkpoint | peak forward memory | prefill tokens/s | "
             + " | ".join(f"decode b{b}" for b in d["decode_s_per_token"]) + " |",
             "|" + "---|" * (6 + len(d["decode_s_per_token"]))]
    groups = _measurement_groups(rows)
    if any(len(g) > 1 for _, g in groups):
        lines[2] += (" Speed and size depend on the layer shapes, not on the values: models of one shape (the "
                     "methods at one retention, and their LoRA-merged versions) share one measurement.")
    slower, more_memory = [], []
    for label, group in groups:
        r, e = group[0], group[0]["efficiency"]
        ratios = []
        for b, s in e["decode_s_per_token"].items():
            ratio = s / d["decode_s_per_token"][b]
            ratios.append(f"{ratio:.2f}x")
            if r is not dense and ratio > 1.0:
                slower.append(f"{label} at {r['retention']:.2f}, decode batch {b}: {ratio:.2f}x dense")
        # above dense where it shows in the table's two decimals (1.00x is not "above")
        if r is not dense and d["peak_forward_bytes"] and e["peak_forward_bytes"] >= 1.005 * d["peak_forward_bytes"]:
            more_memory.append(f"{label} at {r['retention']:.2f}: "
                               f"{_ratio(e['peak_forward_bytes'], d['peak_forward_bytes'])} dense")
        lines.append(f"| {label} | {r['retention']:.2f} | {e['flops_per_token'] / d['flops_per_token']:.2f}x | "
                     f"{e['checkpoint_bytes'] / d['checkpoint_bytes']:.2f}x | "
                     f"{_ratio(e['peak_forward_bytes'], d['peak_forward_bytes'])} | "
                     f"{e['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:.2f}x | " + " | ".join(ratios) + " |")
    lines += ["", f"Peak memory: {d['peak_forward_measure']}."]
    rebuilt = [f"{label} at {g[0]['retention']:.2f}" for label, g in groups
               if "ranks map" in g[0]["efficiency"].get("built_from", "")]
    if rebuilt:
        lines += ["", "Measured on the dense model factored at the row's ranks map, its checkpoint not being kept "
                      "(the same layer shapes, so the same size, FLOPs, memory and speed): "
                  + "; ".join(rebuilt) + "."]
    if slower:
        lines += ["", "Slower than dense (the factored layer runs two matmuls where dense runs one; at small "
                      "shapes and batch sizes that overhead can outweigh the FLOPs saved):"]
        lines += [f"- {s}" for s in slower]
    if more_memory:
        why = ("the resident set also holds freed memory the allocator keeps, more of it when a model's many "
               "distinct layer ranks fragment the heap, so this need not be live tensors (the heap-in-use measure "
               "counts live allocations only)"
               if "resident set" in d["peak_forward_measure"] else
               "activations: each factored layer adds its rank-k intermediate, while its weights are smaller")
        lines += ["", f"Above dense in peak forward memory ({why}):"]
        lines += [f"- {m}" for m in more_memory]
    return lines + [""]


def _serve_lines(report: dict) -> list[str]:
    rows = [r for r in report["rows"] if r.get("serve")]
    if not rows:
        return []
    d = next((r["serve"] for r in rows if r["method"] == "dense"), None)
    first = rows[0]["serve"]
    batches = list(first["throughput_tokens_per_s"])
    lines = ["## Served with vLLM", "",
             f"Every model served by vLLM through air_ft's plugin (tensor parallel {first['tensor_parallel_size']}), "
             f"in turns in one process, {first['rounds']} rounds, medians; {first['tokens']} generated tokens per "
             "request" + ("; ratios to dense in brackets (latency: below 1 is faster; throughput, prefill: above 1 "
                          "is faster)" if d else "") + ". Greedy: prompts whose greedy continuation equals air_ft's "
             "transformers path token for token, and the largest log-probability difference before any "
             "divergence.", "",
             "| model | retention | decode b1 ms/token | " + " | ".join(f"tokens/s at {b}" for b in batches)
             + " | prefill tokens/s | weights | KV cache tokens | greedy equal | max abs logprob diff |",
             "|" + "---|" * (8 + len(batches))]

    def cell(value: float, base: float | None, fmt: str, unit: str = "") -> str:
        return format(value, fmt) + unit + (f" ({value / base:.2f}x)" if base else "")

    for r in rows:
        s = r["serve"]
        agree = s["agreement"]
        diff = agree["max_logprob_diff"]
        lines.append("| " + " | ".join([
            _label(r), f"{r['retention']:.2f}",
            cell(s["decode_s_per_token"] * 1e3, d and d["decode_s_per_token"] * 1e3, ".1f"),
            *(cell(s["throughput_tokens_per_s"][b], d and d["throughput_tokens_per_s"][b], ".0f") for b in batches),
            cell(s["prefill_tokens_per_s"], d and d["prefill_tokens_per_s"], ".0f"),
            cell(s["weight_bytes"] / 2**20, d and d["weight_bytes"] / 2**20, ".0f", " MiB"),
            str(s["kv_cache"]["tokens"]), f"{agree['equal']}/{agree['prompts']}",
            "n/a" if diff is None else f"{diff:.1e}"]) + " |")
    return lines + [""]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json``, the plots and ``report.md`` into ``out_dir`` (each file replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "plots": plot(report, out / "plots"), "head_to_head": head_to_head(report),
              "above_chance": above_chance(report)}
    write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    write_text(out / "report.md", markdown(report))
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots")
    return out / "report.md"


def render_report(out_dir: str | os.PathLike) -> Path:
    """``air-ft report DIR``: re-render ``report.md`` and the plots from ``DIR/report.json``."""
    path = Path(out_dir) / "report.json"
    if not path.exists():
        raise AssetError(f"{path} does not exist; run `air-ft run --recipe ...` with output_dir={out_dir} "
                                "first")
    report = json.loads(path.read_text())
    from air_ft.reasoning import fill_chance  # results scored before chance levels were recorded get them

    fill_chance(report["rows"], data=(report.get("recipe") or {}).get("eval", {}).get("task_data", "auto"))
    return write_report(report, out_dir)


def _short(commit: str) -> str:
    """A commit as a report shows it: ten hex digits, and ``+dirty`` when the code differed from it."""
    sha, _, flag = commit.partition("+")
    return sha[:10] + (f"+{flag}" if flag else "")
