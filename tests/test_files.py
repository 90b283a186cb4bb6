"""files.py: atomic line writes, and line reading whose errors name the file and line."""
import pytest

from paddle_caption.curate.samples import iter_samples
from paddle_caption.data.records import iter_records
from paddle_caption.files import atomic_write, iter_text_lines, write_lines
from paddle_caption.runtime import UserError


def test_write_lines_counts_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "sub" / "lines.txt"
    assert write_lines(out, iter(["a", "b", "中文"])) == 3
    assert out.read_text(encoding="utf-8") == "a\nb\n中文\n"

    def failing():
        yield "new"
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_lines(out, failing())
    # the old file is untouched and no temp file is left beside it
    assert out.read_text(encoding="utf-8") == "a\nb\n中文\n"
    assert [p.name for p in out.parent.iterdir()] == ["lines.txt"]


def test_iter_text_lines_skips_blank_lines_and_names_line_numbers(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("one\n\n  \ntwo\n", encoding="utf-8")
    assert list(iter_text_lines(path, "thing")) == [(f"{path}:1", "one\n"), (f"{path}:4", "two\n")]


def test_line_readers_fail_in_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(UserError, match=r"cannot read records file .*missing\.jsonl"):
        list(iter_records(missing))
    with pytest.raises(UserError, match=r"cannot read samples .*missing\.jsonl"):
        list(iter_samples(missing))

    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes('{"id": "中文"}\n'.encode("gbk"))
    for reader in (iter_records, iter_samples):
        with pytest.raises(UserError, match=r"gbk\.jsonl: not UTF-8 text"):
            list(reader(gbk))

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"id": 1}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"corrupt\.jsonl:2: corrupt sample line"):
        list(iter_samples(corrupt))


def test_atomic_write_binary(tmp_path):
    with atomic_write(tmp_path / "b.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
