"""ACIP-style reduced schedules on SmolLM2-135M, compared on the validation split only.

    python benchmarks/acip_schedule.py --threads 1 \
        --schedule "mask_lr=1.5e-3 lambda_init=3e-3 lambda_growth=1.08 lora_rank=8 lora_lr=2e-3" \
        --schedule "mask_lr=3e-3 lambda_init=1e-3 lambda_growth=1.1 lora_rank=8 lora_lr=2e-3"

A faithful ACIP mask phase (mask lr 5e-5, lambda 1e-3 x 1.01 every 4 steps, batch 4 x 1024 tokens) needs
thousands of steps to reach 0.4; on a 2-core CPU a run gets about 64 steps of 2 x 512 tokens. Each ``--schedule``
(``key=value`` pairs of ``air_ft.acip_fit``, ``lambda_every`` 1 unless given) runs the mask phase on the
calibration split (britannica 0-70 %, plays 0-45 %) until ``--stop-retention``, then ``--post-tune-steps`` of LoRA
alone, and is materialized at every ``--retentions`` it reached. Scored on the validation split (britannica
70-80 %, plays 45-50 %; the geometric mean of the two perplexities), never on the evaluation text, so the winner can
be used for the held-out study. Writes benchmarks/results/acip_schedule_smollm2.json after every schedule; the
schedules an earlier run with the same other settings measured are kept there and not rerun.
"""

from __future__ import annotations

import argparse
import math
import time

from common import MODEL, environment, load_split, previous_results, set_threads, write_json

import air_ft

NUMERIC = {"mask_lr", "lora_lr", "lambda_init", "lambda_growth", "lora_alpha", "lora_dropout", "scale"}
INTEGER = {"lambda_every", "lora_rank"}


def parse_schedule(text: str) -> dict:
    out = {"lambda_every": 1}
    for item in text.split():
        key, sep, val = item.partition("=")
        if not sep or key not in NUMERIC | INTEGER:
            raise ValueError(f"schedule item {item!r}: use key=value with key one of {sorted(NUMERIC | INTEGER)}")
        out[key] = int(val) if key in INTEGER else float(val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--schedule", action="append", required=True, help="key=value pairs of air_ft.acip_fit")
    ap.add_argument("--stop-retention", type=float, default=0.35)
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    ap.add_argument("--max-steps", type=int, default=None,
                    help="a bound on mask-phase steps (default: none, the phase runs until --stop-retention)")
    ap.add_argument("--post-tune-steps", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--val-windows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="acip_schedule_smollm2.json")
    args = ap.parse_args()
    try:
        schedules = [parse_schedule(s) for s in args.schedule]
    except ValueError as err:
        ap.error(str(err))
    if not 0 < args.stop_retention < 1 or any(not args.stop_retention <= r < 1 for r in args.retentions):
        ap.error("--stop-retention must lie in (0, 1) and every --retentions in [stop-retention, 1)")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps must be >= 1 (or left out: the phase then runs until --stop-retention)")
    if min(args.seq_len - 1, args.batch_size, args.val_windows) < 1 or args.post_tune_steps < 0:
        ap.error("--batch-size and --val-windows must be >= 1, --seq-len >= 2, --post-tune-steps >= 0")
    # the trainer's revision is a setting too: runs of an earlier mask phase are not reused
    fixed = {**{k: v for k, v in vars(args).items() if k != "schedule"},
             "acip_revision": air_ft.methods.METHODS["acip"].revision}
    runs = previous_results(args.output, fixed, "runs")
    schedules = [s for s in schedules if s not in [r["schedule"] for r in runs]]
    set_threads(args.threads)
    model, tok = air_ft.load_model(args.model)
    cal = load_split("calibration")
    val = dict(zip(("britannica", "plays"), load_split("validation")))
    for sched in schedules:
        t0 = time.perf_counter()
        fit = air_ft.acip_fit(model, tok, cal, max_steps=args.max_steps, stop_retention=args.stop_retention,
                              post_tune_steps=args.post_tune_steps, seq_len=args.seq_len,
                              batch_size=args.batch_size, progress=False, **sched)
        seconds = time.perf_counter() - t0
        row = {"schedule": sched, "seconds": seconds, "mask_steps": len(fit.history),
               "retention_reached": fit.retention_reached, "train_tokens": fit.tokens, "history": fit.history,
               "validation": {}}
        for r in args.retentions:
            if r < fit.retention_reached:
                continue
            small = fit.materialize(r)
            ppl = {name: air_ft.perplexity(small, tok, text, seq_len=args.seq_len, max_windows=args.val_windows,
                                           batch_size=4) for name, text in val.items()}
            row["validation"][str(r)] = {**ppl, "geo_mean": math.exp(sum(map(math.log, ppl.values())) / 2)}
        runs.append(row)
        print(f"{sched}: {row['mask_steps']} mask steps, reached {row['retention_reached']:.3f}, "
              f"{row['train_tokens']:,} tokens, {seconds:.0f} s; validation "
              + ", ".join(f"{r}: {v['geo_mean']:.1f}" for r, v in row["validation"].items()), flush=True)
        write_json(args.output, {"settings": fixed, "environment": environment(), "runs": runs})


if __name__ == "__main__":
    main()
