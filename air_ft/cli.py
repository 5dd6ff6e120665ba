"""``air-ft`` command line: it parses arguments and hands them to a command (:mod:`air_ft.pipeline`); nothing else.

    air-ft run --recipe recipes/smollm2-135m/study.yaml [key=value ...]     # the whole study -> report
    air-ft compress | train --recipe R [key=value ...]
    air-ft eval --recipe R [--checkpoint DIR] [eval.tasks=[piqa,arc_easy] eval.limit=200]
    air-ft merge --adapter DIR --output DIR
    air-ft export-dense CHECKPOINT OUTPUT
    air-ft report OUTPUT_DIR
    air-ft options [SECTION]                                                 # every recipe field, documented

An :class:`~air_ft.errors.AirFtError` (input that cannot be used; its message says what to change), running out
of memory and a full disk reach the user as one line (``air-ft: error: ...``, exit code 2); ``AIR_FT_DEBUG=1``
shows the traceback instead. Every other exception is a bug in air_ft and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

__all__ = ["main", "user_errors"]

RECIPE_COMMANDS = {
    "run": "the study: compress every method x retention, LoRA-recover, evaluate, write the report",
    "compress": "compress a model to a factored checkpoint",
    "train": "LoRA recovery fine-tuning of a factored model",
    "eval": "perplexity, zero-shot tasks and efficiency of a checkpoint (default: the recipe's model)",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input cannot be used as given"; their messages say what to change."""
    from air_ft.errors import AirFtError

    return (AirFtError,)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="air-ft", description="AIR compression, LoRA recovery and evaluation of "
                                                            "causal LMs")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in RECIPE_COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--recipe", help="YAML recipe (see recipes/)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. compress.retention=0.4")
        if name == "eval":
            p.add_argument("--checkpoint", default=None, help="factored, merged or dense checkpoint directory "
                                                               "(default: the recipe's model)")
    p = sub.add_parser("export-dense", help="multiply factors back into a plain HF checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p = sub.add_parser("merge", help="merge LoRA adapters into a factored checkpoint")
    p.add_argument("--adapter", required=True, help="adapter directory written by `air-ft train`")
    p.add_argument("--output", required=True)
    p.add_argument("--base", default=None, help="factored base checkpoint (default: the one the adapter names)")
    p = sub.add_parser("report", help="re-render report.md and the plots from OUTPUT_DIR/report.json")
    p.add_argument("output_dir")
    p = sub.add_parser("options", help="every recipe field: its default, whether it keys a study's stages, its help")
    p.add_argument("section", nargs="?", default=None, help="one section (model, data, compress, eval, lora, "
                                                            "train, study, acip); default: all")
    return ap


def _dispatch(args: argparse.Namespace) -> None:
    from air_ft.config import load_recipe
    from air_ft.pipeline import commands, execute

    if args.command in RECIPE_COMMANDS:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "run":
            execute.run_study(recipe)
        elif args.command == "compress":
            commands.compress(recipe)
        elif args.command == "train":
            commands.train(recipe)
        else:
            commands.evaluate(recipe, args.checkpoint)
    elif args.command == "export-dense":
        import air_ft

        model, tok = air_ft.load_compressed(args.checkpoint)
        print(f"wrote {air_ft.export_dense(model, tok, args.output)}")
    elif args.command == "merge":
        print(f"wrote {commands.merge(args.adapter, args.output, args.base)}")
    elif args.command == "report":
        from air_ft.report import render_report

        render_report(args.output_dir)
    elif args.command == "options":
        from air_ft.config import describe

        print(describe(args.section))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = os.environ.get("AIR_FT_DEBUG", "") not in ("", "0")
    try:
        import torch

        oom = (torch.OutOfMemoryError, MemoryError)
    except (ImportError, AttributeError):  # pragma: no cover - torch without the type
        oom = (MemoryError,)
    try:
        _dispatch(args)
    except KeyboardInterrupt:
        print("air-ft: interrupted; rerun the same command to continue from the finished stages", file=sys.stderr)
        return 130
    except oom:
        if debug:
            raise
        print("air-ft: error: out of memory; lower compress.batch_size, train.batch_size (raise train.grad_accum) "
              "or eval.batch_size / eval.task_batch_size, or use a device with more memory", file=sys.stderr)
        return 2
    except user_errors() as err:
        if debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"air-ft: error: {msg}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug or not disk_full(err):
            raise
        print("air-ft: error: no space left on the disk; free some, or point output_dir (and AIR_FT_CACHE, the "
              "statistics cache) at a larger disk, then rerun the same command to continue from the finished "
              "stages", file=sys.stderr)
        return 2
    return 0


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is the disk running full: an ``OSError`` with
    ``ENOSPC`` / ``EDQUOT``, or a writer that reports the OS error only in its message (safetensors' Rust writer
    raises ``SafetensorError: ... No space left on device (os error 28)``). A stage that fails so writes no marker,
    so the rerun redoes it (a LoRA run resumes from its last checkpoint)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if os.strerror(errno.ENOSPC) in str(err):  # "No space left on device"
            return True
        err = err.__cause__ or err.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
