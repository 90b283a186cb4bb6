"""convert_labels: every dirty-row kind is rejected with its reason, no good row is lost, runs are
deterministic, resumable after SIGKILL, memory-safe on decompression bombs; records.py reads back."""
import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data.cli import convert_main
from paddle_caption.data.convert import CleanConfig, RunOptions, convert, is_val
from paddle_caption.data.images import ImageRejected, b64decode_strict, decode_image, probe_image
from paddle_caption.data.contest_tsv import iter_lines
from paddle_caption.data.records import RecordError, load_records, read_image_bytes, write_records
from paddle_caption.runtime import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STYLE = "卡通风格。图片中间是一个红色的圆形，背景是白色。"


def image_bytes(w, h, fmt="JPEG", colour=(220, 40, 40)) -> bytes:
    img = Image.new("RGB", (w, h), (245, 245, 245))
    img.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90)
    return buf.getvalue()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros, built row by row (never holding the pixels)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_tsv(path: Path, rows: list[bytes], final_newline=True) -> Path:
    path.write_bytes(b"\n".join(rows) + (b"\n" if final_newline else b""))
    return path


def dirty_dataset(tmp_path):
    """(tsv path, good rows {id: (caption, image bytes)}, expected rejects [(line, id, reason)])."""
    jpg, png, tiny = image_bytes(64, 48), image_bytes(40, 40, "PNG"), image_bytes(8, 8)
    cap = STYLE.encode()
    rows = [
        (b"good1\t" + b64(jpg) + b"\t" + cap, "good1", None),
        (b"good2\t" + b64(png) + b"\t" + "写实风格。图片中间是一个蓝色的菱形。".encode(), "good2", None),
        (b"badutf8\t" + b64(jpg) + b"\t\xff\xfe" + cap, "badutf8", "invalid_utf8"),
        (b"trunc_b64\t" + b64(jpg)[:-3] + b"\t" + cap, "trunc_b64", "bad_base64"),
        (b"trunc_jpeg\t" + b64(jpg[: len(jpg) // 2]) + b"\t" + cap, "trunc_jpeg", "undecodable_image"),
        (b"not_image\t" + b64(b"<html>not an image</html>" * 4) + b"\t" + cap, "not_image", "undecodable_image"),
        (b"tiny\t" + b64(tiny) + b"\t" + cap, "tiny", "image_too_small"),
        (b"good1\t" + b64(image_bytes(50, 50)) + b"\t" + cap, "good1", "duplicate_id"),
        (b"missing_col\t" + b64(jpg), "missing_col", "wrong_column_count"),
        (b"empty_cap\t" + b64(jpg) + b"\t  ", "empty_cap", "empty_caption"),
        (b"no_style\t" + b64(jpg) + b"\t" + "图片中间是一个红色的圆形，背景是白色。".encode(), "no_style", "no_style_phrase"),
        (b"\t" + b64(jpg) + b"\t" + cap, "", "empty_id"),
        (b"", "", "wrong_column_count"),  # a blank line
        (b"good3\t" + b64(jpg) + b"\t" + "3D风格。图片左边是一个黄色的五角星。".encode() + b"\r", "good3", None),  # CRLF
        (b"good4\t" + b64(image_bytes(33, 90)) + b"\t" + cap, "good4", None),  # last row, no newline
    ]
    tsv = write_tsv(tmp_path / "in.tsv", [r for r, _, _ in rows], final_newline=False)
    expected = [(i, rid, reason) for i, (_, rid, reason) in enumerate(rows, 1) if reason]
    good = {"good1": (STYLE, jpg), "good2": ("写实风格。图片中间是一个蓝色的菱形。", png),
            "good3": ("3D风格。图片左边是一个黄色的五角星。", jpg), "good4": (STYLE, None)}
    return tsv, good, expected


def read_rejects(path: Path):
    return [(int(a), b, c) for a, b, c in (line.split("\t") for line in path.read_text("utf-8").splitlines())]


def quiet(workers=1, **kw):
    return RunOptions(workers=workers, progress=False, **kw)


# ------------------------------------------------------------------------------------------ cleaning
@pytest.mark.parametrize("verify", ["fast", "full"])
def test_every_dirty_kind_is_rejected_with_its_reason(tmp_path, verify):
    tsv, good, expected = dirty_dataset(tmp_path)
    out = tmp_path / "out"
    summary = convert(tsv, out, CleanConfig(verify=verify), quiet())

    assert read_rejects(out / "rejects.tsv") == expected
    records = load_records(out / "records.jsonl")
    assert [r["id"] for r in records] == list(good)  # no good row lost, input order kept
    raw = tsv.read_bytes()
    for r in records:
        caption, image = good[r["id"]]
        assert r["caption"] == caption
        assert r["tsv"] == str(tsv.resolve()) and os.path.isabs(r["tsv"])
        row = raw[r["offset"]: r["offset"] + r["length"]]
        assert row.startswith(r["id"].encode() + b"\t") and not row.endswith((b"\r", b"\n"))
        if image is not None:
            assert read_image_bytes(r) == image  # round trip of the exact image bytes
        img = decode_image(read_image_bytes(r))
        assert img.size == (r["width"], r["height"])
    assert summary["rows_read"] == 15 and summary["kept"] == 4 and summary["rejected"] == 11
    assert summary["rejected_by_reason"]["undecodable_image"] == 2
    assert summary["rejected_by_reason"]["wrong_column_count"] == 2
    assert json.loads((out / "summary.json").read_text())["rejected_by_reason"] == summary["rejected_by_reason"]
    assert sorted(p.name for p in out.iterdir()) == ["records.jsonl", "rejects.tsv", "summary.json"]


def jpeg_variants() -> dict:
    """Small textured JPEGs of the kinds met in the wild: 4:2:0, 4:4:4, progressive, grey, CMYK."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (56, 72, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels, "RGB")
    variants = {"420": (rgb, {}), "444": (rgb, {"subsampling": 0}), "progressive": (rgb, {"progressive": True}),
                "grey": (rgb.convert("L"), {}), "cmyk": (rgb.convert("CMYK"), {})}
    out = {}
    for name, (img, options) in variants.items():
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **options)
        out[name] = buf.getvalue()
    return out


def test_fast_verify_rejects_exactly_what_a_full_decode_rejects():
    """`verify fast` (1/8 scale, luma only) must agree with a full-size decode on damaged JPEGs."""
    import random

    def accepted(data, verify):
        try:
            probe_image(data, verify=verify)
            return True
        except ImageRejected:
            return False

    rng = random.Random(0)
    verdicts = []
    for name, data in jpeg_variants().items():
        cases = [data, data[:-2], data + b"trailing junk"]
        cases += [data[:len(data) * k // 12] for k in range(1, 12)]  # cut anywhere, header included
        for _ in range(6):  # a flipped bit, and a run of garbage, in the entropy-coded data
            flipped, garbage = bytearray(data), bytearray(data)
            at = rng.randrange(len(data) // 3, len(data) - 40)
            flipped[at] ^= 1 << rng.randrange(8)
            garbage[at:at + 32] = rng.randbytes(32)
            cases += [bytes(flipped), bytes(garbage)]
        for i, case in enumerate(cases):
            full, fast = accepted(case, "full"), accepted(case, "fast")
            assert fast == full, f"{name} case {i}: full decode says {full}, fast says {fast}"
            verdicts.append(full)
    assert verdicts.count(False) >= 5 * 12 and verdicts.count(True) >= 5 * 3  # both verdicts exercised


def test_base64_accepts_and_rejects_what_the_standard_library_does():
    """b64decode_strict uses pybase64 for speed; its verdicts must be `base64.b64decode(validate=True)`'s."""
    payloads = [b"", b"QQ==", b"QQ", b"QQ=", b"QQ===", b"QQ==QQ==", b"Q===", b"=QUJ", b"QUJD", b"QU JD",
                b"QUJD\n", b"QUJD\r", b"QU-_", b"QU+/", b"QQ==\x00", b"QUJDRA", b"QUJDRA==", "QUJD", "QUJé",
                b64(image_bytes(30, 20)), b64(image_bytes(30, 20))[:-1]]
    for payload in payloads:
        try:
            expected = base64.b64decode(payload, validate=True)
        except ValueError:
            expected = "bad_base64"
        try:
            got = b64decode_strict(payload)
        except ImageRejected as err:
            got = err.reason
        assert got == expected, payload[:20]


def test_rules_can_be_switched_off_by_flag_and_config(tmp_path, capsys):
    tsv, _, _ = dirty_dataset(tmp_path)
    config = tmp_path / "clean.json"
    config.write_text(json.dumps({"require_style": False, "min_side": 8, "dedup_ids": True}))
    out = tmp_path / "out"
    argv = [str(tsv), str(out), "--config", str(config), "--no-dedup", "--no-empty-caption-check",
            "--workers", "1", "--quiet"]
    assert run_cli(convert_main, argv) == 0
    reasons = {rid: reason for _, rid, reason in read_rejects(out / "rejects.tsv")}
    kept = [r["id"] for r in load_records(out / "records.jsonl")]
    # Config turned off the style rule and lowered min_side; flags turned off dedup and empty-caption.
    assert "no_style" in kept and "tiny" in kept and "empty_cap" in kept and kept.count("good1") == 2
    assert "duplicate_id" not in reasons.values()
    assert reasons["badutf8"] == "invalid_utf8"  # structural checks stay on
    assert "kept 8; rejected 7" in capsys.readouterr().out


def test_decompression_bomb_is_rejected_with_flat_memory(tmp_path):
    """A 20000x20000 PNG (and a 9000x9000 one, below PIL's own guard) is a reject and never decoded.

    Decoding either would allocate >= 81 MB (400 MB for the big one); run in a fresh process so
    ru_maxrss measures this conversion only.
    """
    small = png_bomb(64, 48)
    assert Image.open(io.BytesIO(small)).convert("L").size == (64, 48)  # the builder makes real PNGs
    rows = [b"bomb\t" + b64(png_bomb(20000, 20000)) + b"\t" + STYLE.encode(),
            b"bomb2\t" + b64(png_bomb(9000, 9000)) + b"\t" + STYLE.encode(),
            b"ok\t" + b64(small) + b"\t" + STYLE.encode()]
    tsv = write_tsv(tmp_path / "bomb.tsv", rows)
    script = f"""
import json, resource
from paddle_caption.data.convert import CleanConfig, RunOptions, convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for verify in ("fast", "full"):
    convert({str(tsv)!r}, {str(tmp_path / 'out')!r} + verify, CleanConfig(verify=verify),
            RunOptions(workers=1, progress=False))
print(json.dumps({{"delta_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}}))
"""
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    delta_mb = json.loads(proc.stdout.strip().splitlines()[-1])["delta_kb"] / 1024
    print(f"peak RSS delta {delta_mb:.1f} MB")
    assert delta_mb < 40, f"peak RSS grew by {delta_mb:.0f} MB"
    for verify in ("fast", "full"):
        assert read_rejects(tmp_path / f"out{verify}" / "rejects.tsv") == [
            (1, "bomb", "too_many_pixels"), (2, "bomb2", "too_many_pixels")]
        assert [r["id"] for r in load_records(tmp_path / f"out{verify}" / "records.jsonl")] == ["ok"]


def test_ksigma_rejects_length_outliers_in_line_order(tmp_path):
    jpg = b64(image_bytes(40, 40))
    caps = [f"卡通风格{'很' * (i % 3)}。" for i in range(20)]
    caps[4] = "卡通风格" + "长" * 200
    rows = [f"r{i}\t".encode() + jpg + b"\t" + c.encode() for i, c in enumerate(caps)]
    rows.insert(2, b"broken")
    tsv = write_tsv(tmp_path / "k.tsv", rows)
    summary = convert(tsv, tmp_path / "out", CleanConfig(ksigma=3), quiet())
    assert read_rejects(tmp_path / "out" / "rejects.tsv") == [(3, "broken", "wrong_column_count"),
                                                              (6, "r4", "caption_length_outlier")]
    assert summary["kept"] == 19 and summary["ksigma"]["high"] < 204
    assert summary["caption_chars"]["max"] == 204  # statistics are of the kept rows before the filter


# ------------------------------------------------------------------------------------------ determinism
def many_rows_tsv(path: Path, n: int, size=(48, 40)) -> Path:
    images = [b64(image_bytes(size[0] + i, size[1], colour=(i * 40 % 255, 80, 160))) for i in range(5)]
    rows = []
    for i in range(n):
        if i % 17 == 5:
            rows.append(f"id{i}\t".encode() + images[i % 5][:-2] + b"\t" + STYLE.encode())
        elif i % 23 == 7:
            rows.append(f"id{i - 1}\t".encode() + images[i % 5] + b"\t" + STYLE.encode())
        else:
            cap = STYLE + "很" * (i % 7) + ("长" * 80 if i % 97 == 0 else "")
            rows.append(f"id{i}\t".encode() + images[i % 5] + b"\t" + cap.encode())
    return write_tsv(path, rows)


def outputs(out: Path) -> dict:
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("run")
    summary.pop("files")  # paths of this output directory
    files["summary.json"] = summary
    return files


def test_output_identical_for_any_worker_count_and_chunk_size(tmp_path):
    tsv = many_rows_tsv(tmp_path / "in.tsv", 300)
    cfg = CleanConfig(val_fraction=0.25, ksigma=2.5)
    results = []
    for name, opts in (("a", quiet(1, chunk_bytes=1 << 20)), ("b", quiet(2, chunk_bytes=4096)),
                       ("c", quiet(2, chunk_bytes=777))):
        convert(tsv, tmp_path / name, cfg, opts)
        results.append(outputs(tmp_path / name))
    assert results[0] == results[1] == results[2]
    assert results[0]["rejects.tsv"].count(b"duplicate_id") > 0
    assert results[0]["rejects.tsv"].count(b"caption_length_outlier") > 0


def test_val_split_is_deterministic_and_by_id_hash(tmp_path):
    tsv = many_rows_tsv(tmp_path / "in.tsv", 200)
    convert(tsv, tmp_path / "a", CleanConfig(val_fraction=0.3), quiet())
    convert(tsv, tmp_path / "b", CleanConfig(val_fraction=0.3), quiet())
    train, val = load_records(tmp_path / "a" / "records.jsonl"), load_records(tmp_path / "a" / "val_records.jsonl")
    assert (tmp_path / "a" / "val_records.jsonl").read_bytes() == (tmp_path / "b" / "val_records.jsonl").read_bytes()
    assert all(is_val(r["id"], 0.3) for r in val) and not any(is_val(r["id"], 0.3) for r in train)
    assert 0.2 < len(val) / (len(val) + len(train)) < 0.4
    share = sum(is_val(f"x{i}", 0.2) for i in range(5000)) / 5000
    assert 0.18 < share < 0.22
    # Without a split, a stale val file from an earlier run is removed.
    convert(tsv, tmp_path / "a", CleanConfig(), quiet())
    assert not (tmp_path / "a" / "val_records.jsonl").exists()


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    tsv = many_rows_tsv(tmp_path / "in.tsv", 4000, size=(200, 160))
    size = tsv.stat().st_size
    args = [str(tsv), "--val-fraction", "0.2", "--ksigma", "3", "--verify", "full", "--quiet"]
    ref = tmp_path / "ref"
    assert subprocess.run([PY, "tools/convert_labels.py", args[0], str(ref)] + args[1:], cwd=ROOT).returncode == 0

    out = tmp_path / "out"
    cmd = [PY, "tools/convert_labels.py", args[0], str(out)] + args[1:] + [
        "--workers", "2", "--chunk-mb", "0.03", "--checkpoint-seconds", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    state = out / ".convert_state.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["offset"] > size * 0.3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: main process and its workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "records.jsonl").exists() and not (out / "rejects.tsv").exists()
    killed_at = json.loads(state.read_text())["offset"]
    assert 0 < killed_at < size

    # A resume with different cleaning options is refused (one line, non-zero exit).
    bad = subprocess.run(cmd + ["--resume", "--min-side", "10"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--resume" in bad.stderr

    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming at byte {killed_at:,}" in done.stdout
    assert outputs(out) == outputs(ref)
    assert not state.exists() and not (out / ".records.partial").exists()


# ------------------------------------------------------------------------------------------ CLI errors
def test_cli_errors_are_one_line(tmp_path, capsys):
    good = write_tsv(tmp_path / "good.tsv", [b"a\t" + b64(image_bytes(40, 40)) + b"\t" + STYLE.encode()])
    utf16 = tmp_path / "utf16.tsv"
    utf16.write_bytes(("a\tQUJD\t" + STYLE + "\n").encode("utf-16"))
    gbk = tmp_path / "gbk.tsv"
    gbk.write_bytes("\n".join(f"a{i}\tQUJD\t{STYLE}" for i in range(5)).encode("gbk"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cfg_unknown = tmp_path / "u.json"
    cfg_unknown.write_text('{"min_sides": 3}')
    cfg_type = tmp_path / "t.json"
    cfg_type.write_text('{"min_side": "big"}')
    cases = [
        ([str(tmp_path / "missing.tsv"), str(tmp_path / "o")], "missing.tsv"),
        ([str(tmp_path), str(tmp_path / "o")], "is a directory"),
        ([str(good), str(a_file)], "not a directory"),
        ([str(utf16), str(tmp_path / "o")], "UTF-16"),
        ([str(gbk), str(tmp_path / "o")], "not UTF-8"),
        ([str(good), str(tmp_path / "o"), "--config", str(cfg_unknown)], "unknown key 'min_sides'"),
        ([str(good), str(tmp_path / "o"), "--config", str(cfg_type)], "'min_side' must be an integer"),
        ([str(good), str(tmp_path / "o"), "--val-fraction", "1.5"], "val_fraction"),
        ([str(good), str(tmp_path / "o"), "--style-pattern", "(["], "not a valid regex"),
    ]
    for argv, needle in cases:
        assert run_cli(convert_main, argv + ["--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
    # And through the real script: no traceback, one line, exit code 2.
    proc = subprocess.run([PY, "tools/convert_labels.py", str(utf16), str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ records.py
def test_iter_lines_partitions_rows_across_any_byte_ranges(tmp_path):
    rows = [b"a" * n for n in (0, 1, 5, 300, 2, 0, 70)] + [b"x\r", b"last"]
    path = write_tsv(tmp_path / "r.tsv", rows, final_newline=False)
    data = path.read_bytes()
    expected = []
    pos = 0
    for row in rows:
        expected.append((pos, row.rstrip(b"\r")))
        pos += len(row) + 1
    with open(path, "rb") as handle:
        for step in (1, 3, 7, 64, 1000):
            got = []
            for start in range(0, len(data), step):
                got += [(line.offset, line.data)
                        for line in iter_lines(handle, start, start + step, block_size=16)]
            assert got == expected, step
        long = list(iter_lines(handle, max_row_bytes=100, block_size=16))
    assert [(line.offset, line.length, line.data is None) for line in long][3] == (9, 300, True)
    assert [line.data for line in long if line.data is not None][-1] == b"last"


def test_read_image_bytes_works_after_fork_and_detects_stale_records(tmp_path):
    tsv, good, _ = dirty_dataset(tmp_path)
    convert(tsv, tmp_path / "out", CleanConfig(), quiet())
    records = load_records(tmp_path / "out" / "records.jsonl")
    before = [read_image_bytes(r) for r in records]  # opens the descriptor in this process
    import multiprocessing as mp

    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(read_image_bytes, records * 3) == before * 3
    assert before[0] == good["good1"][1]

    write_records(tmp_path / "copy.jsonl", records)
    assert load_records(tmp_path / "copy.jsonl") == records
    stale = dict(records[1], offset=records[0]["offset"], length=records[0]["length"])
    with pytest.raises(RecordError):
        read_image_bytes(stale)
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_records(tmp_path / "bad.jsonl")


def test_muge_layout_one_record_per_reference(tmp_path):
    """MUGE ECommerce-IC: IC_*.tsv (image_id, base64) + IC_*.jsonl captions -> one record per reference
    (or a chosen number), the caption rules applied to each, records readable by the trainer."""
    jpg, png = image_bytes(64, 48), image_bytes(40, 40, "PNG")
    tsv = write_tsv(tmp_path / "IC_train.tsv", [b"im1\t" + b64(jpg), b"im2\t" + b64(png), b"im3\t" + b64(jpg),
                                                b"im4\t" + b64(jpg[:100])])
    captions = tmp_path / "IC_train.jsonl"
    captions.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"image_id": "im1", "text": [STYLE, "图片中间是一个红色的圆形。", "写实风格。一个圆形。"]},
        {"image_id": "im2", "text": ["像素风格。图片中间是一个黄色的五角星。"]},
        {"image_id": "im4", "text": [STYLE]}]) + "\n", encoding="utf-8")
    summary = convert(tsv, tmp_path / "all", CleanConfig(captions=str(captions)), quiet())
    records = load_records(tmp_path / "all" / "records.jsonl")
    assert [(r["id"], r["caption"]) for r in records] == [("im1", STYLE), ("im1", "写实风格。一个圆形。"),
                                                          ("im2", "像素风格。图片中间是一个黄色的五角星。")]
    assert read_image_bytes(records[0]) == read_image_bytes(records[1]) == jpg
    assert read_rejects(tmp_path / "all" / "rejects.tsv") == [(1, "im1", "no_style_phrase"), (3, "im3", "no_reference"),
                                                              (4, "im4", "undecodable_image")]
    assert summary["kept"] == 3
    one = convert(tsv, tmp_path / "one", CleanConfig(captions=str(captions), references_per_image=1), quiet())
    assert [r["caption"] for r in load_records(tmp_path / "one" / "records.jsonl")] == [STYLE, "像素风格。图片中间是一个黄色的五角星。"]
    assert one["kept"] == 2
    assert run_cli(convert_main, [str(tsv), str(tmp_path / "cli"), "--captions", str(captions),
                               "--references-per-image", "2", "--quiet", "--workers", "1"]) == 0
    assert len(load_records(tmp_path / "cli" / "records.jsonl")) == 3
