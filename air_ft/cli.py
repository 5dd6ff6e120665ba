"""``air-ft`` command line: ``compress``, ``demo``, ``eval``, ``export-dense``, ``train``, ``merge``.

Every subcommand reads a YAML recipe plus dotted ``key=value`` overrides, e.g.::

    air-ft compress --recipe recipes/smollm2-135m/air-r60.yaml compress.retention=0.4 output_dir=out/r40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from air_ft.config import Recipe, RecipeError, load_recipe

__all__ = ["main", "run_compress"]


def _texts(specs: list[dict]) -> list[str]:
    from air_ft.data import load_texts

    return load_texts(specs)


def run_metadata(recipe: Recipe) -> dict:
    """Versions, seed and git commit written next to every output."""
    import platform
    import subprocess

    import torch
    import transformers

    import air_ft

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"air_ft": air_ft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "seed": recipe.compress.seed, "git_commit": commit,
            "argv": sys.argv}


def save_resolved(recipe: Recipe, out_dir: Path) -> None:
    import yaml

    from air_ft.config import to_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    (out_dir / "run_metadata.json").write_text(json.dumps(run_metadata(recipe), indent=2))


def run_compress(recipe: Recipe) -> dict:
    """Load, compress, evaluate (if the recipe names evaluation texts) and save a factored checkpoint."""
    import dataclasses

    import air_ft

    cal = _texts(recipe.data.calibration)
    if recipe.compress.method != "svd" and not cal:
        raise RecipeError("data.calibration is empty: give at least one {source: ...} text for calibration")
    evals = {name: _texts([spec])[0] for name, spec in recipe.data.evaluation.items()}
    model, tok = air_ft.load_model(recipe.model.name_or_path, recipe.model.gguf_file, recipe.model.dtype,
                                   recipe.model.device)
    report: dict = {"dense": {}, "compressed": {}}
    for name, text in evals.items():
        report["dense"][name] = air_ft.evaluate_perplexity(model, tok, text, recipe.eval.seq_len,
                                                           recipe.eval.max_windows, recipe.eval.batch_size)
        print(f"dense      {name}: ppl {report['dense'][name]['ppl']:.2f}")
    opts = dataclasses.asdict(recipe.compress)
    info = air_ft.compress(model, tok, cal, device=recipe.model.device, **opts)
    for name, text in evals.items():
        report["compressed"][name] = air_ft.evaluate_perplexity(model, tok, text, recipe.eval.seq_len,
                                                                recipe.eval.max_windows, recipe.eval.batch_size)
        print(f"{recipe.compress.method:<10} {name}: ppl {report['compressed'][name]['ppl']:.2f}")
    out = Path(recipe.output_dir)
    summary = {k: v for k, v in info.items() if k not in ("objective",)}
    air_ft.save_compressed(model, tok, out, metadata={"compress": summary, "perplexity": report})
    save_resolved(recipe, out)
    print(f"retention {info['retention_actual']:.3f} of compressed linear layers "
          f"({info['linear_params_after']:,} / {info['linear_params_before']:,}); whole model "
          f"{info['model_params_after']:,} / {info['model_params_before']:,} parameters")
    print(f"saved factored checkpoint to {out}")
    return {"info": info, "perplexity": report}


def run_demo(recipe: Recipe) -> dict:
    """Dense vs SVD-LLM(W) vs AIR at the recipe's retention, then (``train.max_steps > 0``) AIR + LoRA.

    Prints a perplexity table, writes ``report.json`` and ``perplexity.png`` and the compressed checkpoints under
    ``output_dir``.
    """
    import copy
    import dataclasses

    import air_ft

    out = Path(recipe.output_dir)
    cal = _texts(recipe.data.calibration)
    evals = {name: _texts([spec])[0] for name, spec in recipe.data.evaluation.items()}
    if not evals:
        raise RecipeError("data.evaluation is empty: the demo needs at least one held-out text")
    dense, tok = air_ft.load_model(recipe.model.name_or_path, recipe.model.gguf_file, recipe.model.dtype,
                                   recipe.model.device)

    def ppl(model) -> dict:
        return {n: air_ft.evaluate_perplexity(model, tok, t, recipe.eval.seq_len, recipe.eval.max_windows,
                                              recipe.eval.batch_size)["ppl"] for n, t in evals.items()}

    rows = {"dense": ppl(dense)}
    report: dict = {"retention": recipe.compress.retention, "perplexity": rows, "compress": {}}
    opts = dataclasses.asdict(recipe.compress)
    air_model = None
    for method in ("svdllm", "air"):
        model = copy.deepcopy(dense)
        info = air_ft.compress(model, tok, cal, device=recipe.model.device, **{**opts, "method": method})
        rows[method] = ppl(model)
        report["compress"][method] = {k: info[k] for k in ("retention_actual", "linear_params_before",
                                                          "linear_params_after", "model_params_before",
                                                          "model_params_after", "compression_seconds",
                                                          "calibration_seconds")}
        air_ft.save_compressed(model, tok, out / method, metadata={"compress": report["compress"][method]})
        _print_row(method, rows[method])
        air_model = model
    if recipe.train.max_steps > 0:
        t, lc = recipe.train, recipe.lora
        stats = None
        if lc.init == "residual":  # the Grams of the compression above (disk cache)
            from air_ft.train import calibration_stats

            stats = calibration_stats(dense, tok, cal, recipe.compress)
        tuned = air_ft.finetune(air_model, tok, cal, max_steps=t.max_steps, lora_rank=lc.rank,
                                learning_rate=t.learning_rate, seq_len=t.seq_len, batch_size=t.batch_size,
                                seed=t.seed, placement=lc.placement, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                merge=lc.merge, lora_init=lc.init, stats=stats, warmup_ratio=t.warmup_ratio,
                                grad_accum=t.grad_accum,
                                distill=t.distill, distill_temperature=t.distill_temperature,
                                teacher=dense, progress=t.progress)
        rows["air+lora"] = ppl(tuned)
        _print_row("air+lora", rows["air+lora"])
    _print_table(rows, recipe)
    save_resolved(recipe, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "perplexity.png", recipe)
    print(f"wrote {out / 'report.json'} and {out / 'perplexity.png'}")
    return report


def _print_row(name: str, ppls: dict) -> None:
    print(f"{name:>10}: " + "  ".join(f"{k} ppl {v:.2f}" for k, v in ppls.items()), flush=True)


def _print_table(rows: dict, recipe: Recipe) -> None:
    names = list(next(iter(rows.values())))
    print(f"\nperplexity at retention {recipe.compress.retention} of the decoder linear layers "
          f"({recipe.eval.seq_len}-token windows)")
    print(f"{'model':>10} " + " ".join(f"{n:>12}" for n in names))
    for label, ppls in rows.items():
        print(f"{label:>10} " + " ".join(f"{ppls[n]:12.2f}" for n in names))


def _plot(rows: dict, path: Path, recipe: Recipe) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, (label, ppls) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(names))], [ppls[n] for n in names], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"retention {recipe.compress.retention} of decoder linear parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(recipe: Recipe, checkpoint: str) -> dict:
    import air_ft

    model, tok = air_ft.load_compressed(checkpoint, device=recipe.model.device)
    out = {}
    for name, spec in recipe.data.evaluation.items():
        text = _texts([spec])[0]
        out[name] = air_ft.evaluate_perplexity(model, tok, text, recipe.eval.seq_len, recipe.eval.max_windows,
                                               recipe.eval.batch_size)
        print(f"{name}: ppl {out[name]['ppl']:.2f} over {out[name]['tokens']} tokens")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="air-ft", description="AIR compression and LoRA recovery of causal LMs")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("compress", "compress a model to a factored checkpoint"),
                        ("train", "LoRA recovery fine-tuning of a factored model"),
                        ("demo", "dense vs SVD-LLM(W) vs AIR (+LoRA) on the recipe's model, with a plot"),
                        ("eval", "perplexity of a factored checkpoint on the recipe's evaluation texts")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--recipe", help="YAML recipe (see recipes/)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. compress.retention=0.4")
        if name == "eval":
            p.add_argument("--checkpoint", required=True)
    p = sub.add_parser("export-dense", help="multiply factors back into a plain HF checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p = sub.add_parser("merge", help="merge LoRA adapters into a factored checkpoint")
    p.add_argument("--adapter", required=True, help="adapter directory written by `air-ft train`")
    p.add_argument("--output", required=True)
    p.add_argument("--base", default=None, help="factored base checkpoint (default: the one the adapter names)")
    args = ap.parse_args(argv)
    try:
        if args.command == "compress":
            run_compress(load_recipe(args.recipe, args.overrides))
        elif args.command == "demo":
            run_demo(load_recipe(args.recipe, args.overrides))
        elif args.command == "eval":
            run_eval(load_recipe(args.recipe, args.overrides), args.checkpoint)
        elif args.command == "export-dense":
            import air_ft

            model, tok = air_ft.load_compressed(args.checkpoint)
            print(f"wrote {air_ft.export_dense(model, tok, args.output)}")
        elif args.command == "train":
            from air_ft.train import run_train

            run_train(load_recipe(args.recipe, args.overrides))
        elif args.command == "merge":
            from air_ft.train import run_merge

            run_merge(args.adapter, args.output, args.base)
    except (RecipeError, FileNotFoundError) as err:
        print(f"air-ft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
