"""What is written next to every output so that a result can be traced: the resolved recipe, package versions,
seed, git commit and command line, and for a study the content hashes of the texts and task documents."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from air_ft.config import Recipe, to_dict
from air_ft.files import write_json, write_text

__all__ = ["run_metadata", "git_commit", "save_resolved", "study_provenance"]

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "lm-eval")


def git_commit(package: Path | None = None) -> str:
    """The git commit of the package's checkout, with ``+dirty`` when the package's files differ from it (the
    figures then come from code no commit holds); '' outside a checkout."""
    package = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return ""
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=package, capture_output=True,
                                 timeout=10).returncode == 1
        return head + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def run_metadata(recipe: Recipe) -> dict:
    """Versions, seed, git commit, command line, and the model the recipe names: its resolved path, and for a
    single file (a GGUF, one joined from chunk wheels) its size and sha256."""
    from importlib.metadata import PackageNotFoundError, version

    import air_ft
    from air_ft.assets import file_record

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"air_ft": air_ft.__version__, **versions, "python": platform.python_version(),
            "seed": recipe.compress.seed, "git_commit": git_commit(), "argv": sys.argv,
            "model": file_record(recipe.model.name_or_path, recipe.model.gguf_file)}


def save_resolved(recipe: Recipe, out_dir: Path) -> None:
    """``recipe.resolved.yaml`` and ``run_metadata.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "recipe.resolved.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    write_json(out_dir / "run_metadata.json", run_metadata(recipe))


def study_provenance(recipe: Recipe, eval_texts: dict[str, str], rows: list[dict]) -> dict:
    """Where every evaluation text and task came from, with content hashes, and the calibration sources."""
    texts = {name: {**recipe.data.evaluation[name], "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
                    "characters": len(text)} for name, text in eval_texts.items()}
    tasks = {}
    for row in rows:
        for task, res in row.get("tasks", {}).items():
            tasks.setdefault(task, {k: res.get(k) for k in ("source", "split", "papers_split", "content_sha256",
                                                             "documents_sha256", "n", "of", "seed", "lm_eval")})
    return {"texts": texts, "calibration": recipe.data.calibration, "tasks": tasks}
