"""The index of ``benchmarks/results/``: every entry, where it is cited, and the command recorded in it.

An entry is kept only while ``README.md``, ``benchmarks/README.md`` or ``docs/`` cite it, or a cited entry names it
(the parts a combined JSON was built from). ``tests/test_benchmarks.py`` fails on an uncited entry and on an index
that is out of date.

    python benchmarks/index.py            # rewrites benchmarks/results/INDEX.md
    python benchmarks/index.py --check    # exit 1 and the list when an entry is uncited or the index is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX = RESULTS / "INDEX.md"
DOCS = ("README.md", "benchmarks/README.md")


def _documents() -> dict[str, str]:
    docs = {name: (ROOT / name).read_text() for name in DOCS}
    docs.update({str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))})
    return docs


def _section(text: str, needle: str) -> str:
    """The heading above the first mention of ``needle``."""
    head = text[:text.index(needle)]
    headings = [line.lstrip("#").strip() for line in head.splitlines() if line.startswith("#")]
    return headings[-1] if headings else ""


def _text_of(entry: Path) -> str:
    if entry.is_dir():
        return "".join(p.read_text(errors="ignore") for p in sorted(entry.rglob("*.md")))
    return entry.read_text(errors="ignore") if entry.suffix in (".json", ".md") else ""


def _command(entry: Path) -> str:
    """The command a result records about itself, where it does."""
    path = entry / "report.json" if entry.is_dir() else entry
    if path.suffix != ".json" or not path.exists():
        return ""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return ""
    if isinstance(data, dict):
        if isinstance(data.get("command"), str):
            return data["command"]
        argv = (data.get("environment") or {}).get("argv")
        if argv:
            return "air-ft " + " ".join(argv[1:]) if argv[0].endswith("air-ft") else " ".join(argv)
    return ""


def citations() -> dict[str, list[str]]:
    """Entry -> where it is cited (``doc: section`` or ``part of <entry>``); [] for an uncited one."""
    names = sorted(p.name for p in RESULTS.iterdir() if p.name != INDEX.name)
    cited: dict[str, list[str]] = {n: [] for n in names}
    for doc, text in _documents().items():
        for n in names:
            if n in text:
                cited[n].append(f"{doc}: {_section(text, n)}")
    frontier = [n for n in names if cited[n]]
    while frontier:
        parent = frontier.pop()
        text = _text_of(RESULTS / parent)
        for n in names:
            if n != parent and not cited[n] and n in text:
                cited[n].append(f"part of {parent}")
                frontier.append(n)
    return cited


def render() -> str:
    lines = ["# benchmarks/results", "",
             "Every entry, where it is cited and the command it records (regenerate: `python benchmarks/index.py`).",
             "", "| entry | cited in | command |", "|---|---|---|"]
    for name, where in citations().items():
        cmd = _command(RESULTS / name).replace("|", "\\|")
        lines.append(f"| `{name}` | {'; '.join(where) or '**nowhere**'} | {f'`{cmd}`' if cmd else ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    uncited = [n for n, where in citations().items() if not where]
    text = render()
    if args.check:
        stale = not INDEX.exists() or INDEX.read_text() != text
        for n in uncited:
            print(f"uncited: benchmarks/results/{n}")
        if stale:
            print("benchmarks/results/INDEX.md is out of date: run python benchmarks/index.py")
        return 1 if uncited or stale else 0
    INDEX.write_text(text)
    print(f"wrote {INDEX} ({len(text.splitlines()) - 6} entries, {len(uncited)} uncited)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
