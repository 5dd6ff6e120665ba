"""The AIR paper's two claims against ACIP, read from a finished study's report (nothing is run).

    python benchmarks/acip_claims.py                      # the SmolLM2 study -> acip_claims_smollm2.json

The claims: (1) AIR alone, with no gradient step, beats ACIP (which trains masks and LoRA while compressing);
(2) AIR + LoRA beats ACIP + LoRA at equal total training tokens (``study.equal_tokens``: ACIP's mask phase and
post-tune come off its LoRA steps). For every retention of the study and each pair (AIR, and the default AIR-2S,
against ACIP-style; each with and without LoRA) this script writes the held-out perplexities and their relative
difference, the mean accuracy over the tasks with the standard error of the difference (the two rows' task errors
taken as independent: conservative), the largest single-task gap in standard errors, the tokens each row trained
on, and a verdict per measure: ``held`` (lower perplexity on every held-out text; accuracy higher by more than two
standard errors), ``reversed`` (the opposite), otherwise ``not resolved``. Writes
benchmarks/results/<output> and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import HELD_OUT, RESULTS, environment, write_json

from air_ft.rows import mean_accuracy, mean_accuracy_se, task_gap

PAIRS = (("air", "acip", "AIR alone exceeds ACIP"), ("air2s", "acip", "AIR-2S (the default) alone exceeds ACIP"))
Z = 2.0  # a difference counts beyond Z standard errors


def compare(ours: dict, theirs: dict) -> dict:
    """One pair of rows: perplexity and accuracy differences (``ours`` minus ``theirs``) with their verdicts."""
    ppl = {t: {"ours": ours["perplexity"][t]["ppl"], "theirs": theirs["perplexity"][t]["ppl"]} for t in HELD_OUT}
    for v in ppl.values():
        v["relative"] = v["ours"] / v["theirs"] - 1.0
    rel = [v["relative"] for v in ppl.values()]
    out = {"perplexity": ppl, "perplexity_verdict": "held" if all(r < 0 for r in rel)
           else "reversed" if all(r > 0 for r in rel) else "not resolved",
           "tokens": {"ours": ours.get("tokens"), "theirs": theirs.get("tokens")}}
    a, b = mean_accuracy(ours), mean_accuracy(theirs)
    if a is None or b is None:
        return {**out, "accuracy": None, "accuracy_verdict": None}
    diff, se = a - b, math.hypot(mean_accuracy_se(ours), mean_accuracy_se(theirs))
    gaps = {t: task_gap(ours["tasks"][t], theirs["tasks"][t]) for t in ours["tasks"] if t in theirs["tasks"]}
    z = {t: g / s if s else 0.0 for t, (g, s) in gaps.items()}
    widest = max(z, key=lambda t: abs(z[t]))
    verdict = "held" if diff > Z * se else "reversed" if diff < -Z * se else "not resolved"
    return {**out, "accuracy": {"ours": a, "theirs": b, "difference": diff, "se": se, "z": diff / se if se else 0.0,
                                "widest_task": widest, "widest_task_z": z[widest]},
            "accuracy_verdict": verdict}


def claims(report: dict) -> list[dict]:
    """Every (retention, pair, with / without LoRA) the report holds both rows of."""
    rows = {r["name"]: r for r in report["rows"]}
    out = []
    for retention in sorted({r["retention"] for r in report["rows"] if r["method"] == "acip"}, reverse=True):
        for ours, theirs, claim in PAIRS:
            for lora in (False, True):
                suffix = "+lora" if lora else ""
                a, b = rows.get(f"{ours}-r{retention:.2f}{suffix}"), rows.get(f"{theirs}-r{retention:.2f}{suffix}")
                if a is None or b is None:
                    continue
                text = claim if not lora else claim.replace(" alone", " + LoRA").replace(
                    "ACIP", "ACIP + LoRA at equal total training tokens")
                out.append({"retention": retention, "ours": a["name"], "theirs": b["name"], "lora": lora,
                            "claim": text, **compare(a, b)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=str(RESULTS / "study_smollm2"), help="a study's output directory")
    ap.add_argument("--output", default="acip_claims_smollm2.json")
    args = ap.parse_args()
    path = Path(args.study)
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError) as e:
        ap.error(f"cannot read {path}/report.json ({e}): give --study a finished study's directory")
    rows = claims(report)
    if not rows:
        ap.error(f"{path}/report.json holds no ACIP-style row beside an AIR row: run the study with acip in "
                 "study.methods")
    write_json(args.output, {"study": str(args.study), "report_commit": report["environment"].get("git_commit"),
                             "z": Z, "environment": environment(), "rows": rows})
    print(f"{'retention':>9} {'ours':<16} {'theirs':<16} {'ppl ' + ' / '.join(HELD_OUT):<26} "
          f"{'acc diff +- SE':<16} ppl / acc verdict")
    for r in rows:
        ppl = " / ".join(f"{v['relative'] * 100:+.1f}%" for v in r["perplexity"].values())
        acc = r["accuracy"]
        acc_s = f"{acc['difference'] * 100:+.1f} +- {acc['se'] * 100:.1f}" if acc else "-"
        print(f"{r['retention']:>9.2f} {r['ours']:<16} {r['theirs']:<16} {ppl:<26} {acc_s:<16} "
              f"{r['perplexity_verdict']} / {r['accuracy_verdict']}")
    print(f"wrote {RESULTS / args.output}")


if __name__ == "__main__":
    main()
