"""vLLM serving of AIR-factored SmolLM2-135M at 0.8 / 0.6 / 0.4 against dense, in one process.

    python benchmarks/serve.py                        # in the vLLM environment (README: Serve)
    python benchmarks/serve.py --device-tag h100      # on a GPU: same study, output serve_smollm2_h100.json

The grid is the study ``recipes/smollm2-135m/serve.yaml`` (``eval.serve: true``), run by
``air_ft.pipeline.run_study`` into ``benchmarks/results/serve_smollm2_<tag>/`` (its report and stage markers; a
rerun reuses every finished stage). Its serve stage starts one vLLM engine per model in turn in this process and
measures decode latency at batch 1, output throughput at 16 and 64 concurrent requests, prefill throughput, the
weight bytes the engine holds and the KV cache it allocated, and checks each model's greedy continuations (32
tokens, four prompts) against air_ft's own transformers path. This script reads the report and writes
benchmarks/results/serve_smollm2_<tag>.json (+ .png): every figure and its ratio to dense.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, ROOT, repo_path, save_figure, subplots, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "serve.yaml"))
    ap.add_argument("--device-tag", default="cpu", help="names the output (cpu, h100, ...)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.device=cuda eval.serve_engine={}")
    args = ap.parse_args()
    args.recipe = str(Path(args.recipe).resolve())  # a relative --recipe: the JSON names it relative to the repo
    from air_ft.config import load_recipe
    from air_ft.pipeline import run_study

    name = f"serve_smollm2_{args.device_tag}"
    study_dir = RESULTS / name
    recipe = load_recipe(args.recipe, [f"output_dir={study_dir}", *args.overrides])
    report = run_study(recipe)
    rows = [{"name": r["name"], "method": r["method"], "retention": r["retention"],
             "perplexity": {t: v["ppl"] for t, v in r["perplexity"].items()}, **r["serve"]}
            for r in report["rows"]]
    batches = list(rows[0]["throughput_tokens_per_s"])
    print("\n| model | retention | decode b1 | " + " | ".join(f"throughput b{b}" for b in batches)
          + " | prefill | weights | KV tokens | greedy equal | max logprob diff |")
    print("|" + "---|" * (8 + len(batches)))
    for r in rows:
        v = r.get("vs_reference") or {}
        a = r["agreement"]
        print(f"| {r['name']} | {r['retention']:.2f} | {r['decode_s_per_token'] * 1e3:.1f} ms "
              f"({v.get('decode_latency', 1):.2f}x) | "
              + " | ".join(f"{r['throughput_tokens_per_s'][b]:.0f}/s ({v.get('throughput', {}).get(b, 1):.2f}x)"
                           for b in batches)
              + f" | {r['prefill_tokens_per_s']:.0f}/s ({v.get('prefill', 1):.2f}x) | "
                f"{r['weight_bytes'] / 2**20:.0f} MiB ({v.get('weight_bytes', 1):.2f}x) | {r['kv_cache']['tokens']} | "
                f"{a['equal']}/{a['prompts']} | {a['max_logprob_diff']:.1e} |")
    path = write_json(f"{name}.json", {"recipe": repo_path(args.recipe), "study": name,
                                       "environment": report["environment"], "rows": rows})
    fig, axes = subplots(1, 2, 4.5, 3.4)
    compressed = [r for r in rows if r["method"] != "dense"]
    xs = [r["retention"] for r in compressed]
    ax = axes[0][0]
    ax.plot(xs, [r["vs_reference"]["decode_latency"] for r in compressed], "o-", label="decode latency, batch 1")
    ax.plot(xs, [r["vs_reference"]["weight_bytes"] for r in compressed], "s--", label="weight bytes")
    ax.set_ylabel("ratio to dense (below 1: better)")
    ax = axes[0][1]
    for b in batches:
        ax.plot(xs, [r["vs_reference"]["throughput"][b] for r in compressed], "o-", label=f"throughput, {b} requests")
    ax.plot(xs, [r["vs_reference"]["prefill"] for r in compressed], "s--", label="prefill")
    ax.set_ylabel("ratio to dense (above 1: better)")
    for ax in axes[0]:
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("retention")
        ax.legend(fontsize=7)
    save_figure(fig, RESULTS / f"{name}.png")
    print(f"wrote {path} and the study's report in {study_dir}")


if __name__ == "__main__":
    main()
