"""The report's PNG plots, drawn from ``report.json`` alone: perplexity and accuracy against retention, training
loss, and speed and size against dense."""

from __future__ import annotations

from pathlib import Path

from air_ft.rows import columns as _columns
from air_ft.rows import label as _label
from air_ft.rows import mean_accuracy as _mean_accuracy
from air_ft.rows import measurement_groups as _measurement_groups

__all__ = ["plot"]


def plot(report: dict, out_dir: Path) -> list[str]:
    """PNG plots next to the report; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    texts, tasks, _ = _columns(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            series.setdefault(_label(r), []).append(r)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if texts:
        fig, axes = plt.subplots(1, len(texts), figsize=(4.5 * len(texts), 3.6), squeeze=False)
        for ax, t in zip(axes[0], texts):
            for label, rs in series.items():
                pts = sorted((r["retention"], r["perplexity"][t]["ppl"]) for r in rs if t in r["perplexity"])
                ax.plot(*zip(*pts), marker="o", label=label)
            if dense and t in dense["perplexity"]:
                ax.axhline(dense["perplexity"][t]["ppl"], color="k", ls="--", lw=1, label="dense")
            ax.set_yscale("log")
            ax.set_xlabel("retention (decoder linear parameters kept)")
            ax.set_ylabel(f"perplexity, {t} (log)")
            ax.invert_xaxis()
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out_dir / "perplexity.png"))
    if tasks:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for label, rs in series.items():
            pts = sorted((r["retention"], 100 * _mean_accuracy(r)) for r in rs if r.get("tasks"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if dense and dense.get("tasks"):
            ax.axhline(100 * _mean_accuracy(dense), color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("retention")
        ax.set_ylabel(f"mean accuracy over {len(tasks)} tasks (%)")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "accuracy.png"))
    logs = [(f"{_label(r)} {r['retention']:.2f}", r["train_log"]) for r in rows if r.get("train_log")]
    if logs:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label, log in logs:
            pts = [(e["step"], e["loss"]) for e in log if "loss" in e]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "train_loss.png"))
    # one bar per measurement: the rows of one shape share it
    eff = [(label, group[0]) for label, group in _measurement_groups(rows) if group[0]["method"] != "dense"]
    if dense and dense.get("efficiency") and eff:
        d = dense["efficiency"]
        metrics = {f"decode b{b}": (lambda e, b=b: d["decode_s_per_token"][b] / e["decode_s_per_token"][b])
                   for b in d["decode_s_per_token"]}
        metrics["prefill"] = lambda e: e["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]
        metrics["checkpoint"] = lambda e: d["checkpoint_bytes"] / e["checkpoint_bytes"]
        fig, ax = plt.subplots(figsize=(min(14.0, 0.6 * len(metrics) * len(eff) + 4), 3.6))
        width = 0.8 / len(eff)
        for i, (label, r) in enumerate(eff):
            ax.bar([j + i * width for j in range(len(metrics))], [f(r["efficiency"]) for f in metrics.values()],
                   width, label=f"{r['retention']:.2f}: {label}")
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], list(metrics), fontsize=8)
        ax.set_ylabel("speed-up / size reduction vs dense (x)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "efficiency.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
