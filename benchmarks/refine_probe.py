"""Block refinement at several learning rates on a compressed model's own blocks: does a rate lower the exit error?

    python benchmarks/refine_probe.py --recipe recipes/qwen2.5-coder-0.5b/levers.yaml \
        --checkpoint benchmarks/results/levers_qwen2.5-coder-0.5b/stages/compress/air-r0.80-combined-2s/checkpoint \
        --blocks 0 12 22 --output refine_probe_qwen2.5-coder-0.5b.json

The refinement of ``compress.refine_steps`` (air_ft.refine.refine_block) run again, outside a compression, on blocks
of a factored checkpoint: each block is fed the hidden states the compressed model produces at its entry and tuned
toward the dense model's states at its exit, on the recipe's calibration windows (``compress.num_samples`` x
``seq_len``, seed as in the recipe), ``--steps`` Adam steps of ``batch_size`` windows (the default's 16), for each of
``--rates`` (``absolute:LR`` or ``rms:LR``, ``compress.refine_lr_scale``). Where the checkpoint's refinement kept the
factoring's factors in every block (its stage record says so), these are exactly the inputs, targets and start the
compression's refinement had. Writes, per block and rate, the relative exit error before and after (the kept-best
rule off: ``after`` is the error the steps reached, also where it is higher; ``kept`` what a compression keeps) to
benchmarks/results/<output>.
"""

from __future__ import annotations

import argparse
import copy
import time

from common import repo_path, write_json

RATES = ["absolute:3e-4", "absolute:1e-4", "absolute:3e-5", "absolute:1e-5", "rms:1e-2", "rms:3e-3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="the recipe the checkpoint was compressed with (model, data)")
    ap.add_argument("--checkpoint", required=True, help="a factored checkpoint (air_ft.save_compressed)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0], help="decoder blocks to refine, each on its own")
    ap.add_argument("--rates", nargs="+", default=RATES, help="SCALE:LR, SCALE absolute or rms")
    ap.add_argument("--steps", type=int, default=16, help="Adam steps per block and rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default="refine_probe.json")
    args = ap.parse_args()
    import json
    from pathlib import Path

    from air_ft.checkpoint import MARKER
    from air_ft.refine import REFINE_LR_SCALES

    rates = []
    for item in args.rates:
        scale, _, lr = item.partition(":")
        if scale not in REFINE_LR_SCALES or not lr:
            ap.error(f"--rates {item!r}: write SCALE:LR with SCALE one of {REFINE_LR_SCALES}, e.g. rms:1e-2")
        try:
            rates.append((scale, float(lr)))
        except ValueError:
            ap.error(f"--rates {item!r}: LR must be a number, e.g. rms:1e-2")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if not (Path(args.checkpoint) / MARKER).is_file():
        ap.error(f"--checkpoint {args.checkpoint!r} is not a factored checkpoint (no {MARKER} in it)")
    n_blocks = json.loads((Path(args.checkpoint) / "config.json").read_text()).get("num_hidden_layers")
    if n_blocks is not None and any(not 0 <= b < n_blocks for b in args.blocks):
        ap.error(f"--blocks must lie in 0..{n_blocks - 1}")

    import torch

    import air_ft
    from air_ft.config import RecipeError, load_recipe
    from air_ft.data import sample_windows
    from air_ft.modeling import LowRankLinear
    from air_ft.pipeline import commands
    from air_ft.refine import refine_block
    from air_ft.stream import capture_inputs, find_blocks, run_block

    torch.set_num_threads(args.threads)
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as err:
        ap.error(str(err))
    cfg = recipe.compress
    dense, tok = commands.load_dense(recipe)
    compressed, _ = air_ft.load_compressed(args.checkpoint)
    windows = sample_windows(tok, commands.texts(recipe.data.calibration), cfg.num_samples, cfg.seq_len, cfg.seed)
    batches = list(windows.split(cfg.batch_size))
    targets = [n for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)]

    def stream(model, exits: bool) -> dict[int, tuple]:
        """Per probed block, as the compression's stream holds them (air_ft.stream): its entry hidden states and
        other arguments, or (``exits``) the hidden states it hands on."""
        blocks = find_blocks(model, targets)
        inputs = capture_inputs(model, blocks, batches, "cpu")
        got = {}
        for i in range(max(args.blocks) + 1):
            if i in args.blocks and not exits:
                got[i] = (list(inputs.hidden), inputs.extra[i])
            run_block(blocks, i, inputs, update=True)
            if i in args.blocks and exits:
                got[i] = list(inputs.hidden)
        return got

    entries, exits = stream(compressed, False), stream(dense, True)
    del dense
    rows = []
    for b in args.blocks:
        hidden, extra = entries[b]
        for scale, lr in rates:
            block = copy.deepcopy(compressed.model.layers[b])
            t0 = time.perf_counter()
            rec = refine_block(block, hidden, extra, exits[b], args.steps, lr, sharded=False,
                               loss=cfg.refine_loss, lr_scale=scale, keep_best=False)
            reached = rec.after
            row = {"block": b, "lr_scale": scale, "lr": lr, "before": rec.before, "after": reached,
                   "kept": min(reached, rec.before), "ratio": reached / rec.before,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"block {b:>2} {scale:>8} {lr:<7g} before {rec.before:.6f} reached {reached:.6f} "
                  f"({row['ratio']:.4f})", flush=True)
    print("\n| block | " + " | ".join(f"{s} {lr:g}" for s, lr in rates) + " |\n" + "|---" * (len(rates) + 1) + "|")
    for b in args.blocks:
        print(f"| {b} | " + " | ".join(f"{r['ratio']:.3f}" for r in rows if r["block"] == b) + " |")
    path = write_json(args.output, {"recipe": repo_path(args.recipe), "checkpoint": repo_path(args.checkpoint),
                                    "steps": args.steps, "windows": len(windows),
                                    "windows_per_step": cfg.batch_size, "loss": cfg.refine_loss, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
