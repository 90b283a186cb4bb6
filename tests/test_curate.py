"""Data curation: thresholds on the data, every op, the ledger, streaming, resume, sharding, formats."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_caption import shards
from paddle_caption.curate.ops import OpContext, build_op
from paddle_caption.curate.ops.cluster import proportional_quotas
from paddle_caption.curate.recipe import Recipe, load_recipe
from paddle_caption.curate.runner import CurationRun, curate
from paddle_caption.curate.samples import iter_samples
from paddle_caption.curate.thresholds import resolve_bound
from paddle_caption.data.distribution import LengthHistogram, exact_quantiles, moments
from paddle_caption.runtime import UserError

ROOT = Path(__file__).resolve().parents[1]


def nearest_rank(values, q):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


# ---- thresholds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_quantiles_match_nearest_rank_with_few_passes(seed):
    rng = np.random.default_rng(seed)
    values = list(np.round(rng.standard_normal(5001) * 3, 2))  # many ties
    passes = []

    def read():
        passes.append(1)
        return iter(values)

    qs = [0, 1, 5, 50, 90, 99.9, 100]
    stats = moments(read())
    got = exact_quantiles(read, qs, stats)
    assert got == [nearest_rank(values, q) for q in qs]
    assert len(passes) == 3  # moments, histogram, the wanted bins: never a list of the rows


def test_quantiles_agree_with_the_length_histogram():
    hist = LengthHistogram()
    values = [3, 7, 7, 7, 12, 30, 30, 41]
    for v in values:
        hist.add(v)
    for q in (10, 50, 90, 99):
        assert exact_quantiles(lambda: iter(values), [q])[0] == hist.percentile(q)


def test_bounds_computed_on_the_data():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    read = lambda: iter(values)  # noqa: E731
    stats = moments(read())
    assert stats.mean == pytest.approx(4.0) and stats.std == pytest.approx(np.std(values))
    assert resolve_bound("mean", read, stats) == pytest.approx(4.0)
    assert resolve_bound({"mean_std": -1}, read, stats) == pytest.approx(4.0 - np.std(values))
    assert resolve_bound({"percentile": 40}, read, stats) == 2.0
    assert resolve_bound(2.5, read, stats) == 2.5


# ---- recipes --------------------------------------------------------------------------------------
def test_recipe_errors_name_the_entry(tmp_path):
    ctx = OpContext(work_dir=tmp_path)
    with pytest.raises(UserError, match=r"process\[1\]: unknown op 'nope'"):
        build_op({"nope": {}}, ctx, "process[1]")
    with pytest.raises(UserError, match=r"process\[0\] \(caption_length_filter\): unknown key 'minimum'"):
        build_op({"caption_length_filter": {"minimum": 3}}, ctx, "process[0]")
    with pytest.raises(UserError, match="a bound is"):
        build_op({"caption_length_filter": {"min": {"median": 1}}}, ctx, "process[0]")
    with pytest.raises(UserError, match="give min and/or max"):
        build_op({"image_aspect_ratio_filter": {}}, ctx, "process[0]")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"dataset": str(path), "process": [], "colour": 1}))
    with pytest.raises(UserError, match="unknown key 'colour'"):
        load_recipe(path)


def test_list_ops_names_every_op_with_its_summary(capsys):
    from paddle_caption.curate.cli import main
    from paddle_caption.curate.ops import OPS

    assert main(["--list_ops"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(OPS) and all(len(line.split()) > 2 for line in lines)


# ---- the runner on converted synthetic rows -------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_world(tmp_path_factory):
    """A converted synthetic dataset with documented noise and an unlabeled pool."""
    from paddle_caption.data.convert import RunOptions, convert
    from paddle_caption.data.synthetic import NoiseConfig, write_dataset

    root = tmp_path_factory.mktemp("noisy_world")
    noise = NoiseConfig(mismatched=0.15, wrong_word=0.1, truncated=0.05, near_duplicate=0.1, unlabeled=6)
    write_dataset(root / "data", 120, 4, 4, seed=5, workers=1, progress=False, noise=noise)
    convert(root / "data" / "train.tsv", root / "train", opts=RunOptions(workers=1, progress=False))
    kinds = dict(line.split("\t")[:2] for line in (root / "data" / "train_noise.tsv").read_text().splitlines())
    return {"root": root, "records": root / "train" / "records.jsonl", "kinds": kinds,
            "unlabeled": root / "data" / "unlabeled.tsv"}


def run_recipe(tmp_path, dataset, process, **extra) -> dict:
    recipe = Recipe(dataset=str(dataset), export_dir=str(tmp_path / "out"), process=process, **extra)
    return curate(recipe.validate("test"), progress=False, log=lambda *a: None)


def ledger(summary) -> list[dict]:
    return [json.loads(line) for line in Path(summary["output"]["files"]["ledger"]).read_text().splitlines()]


def test_length_filter_thresholds_and_ledger(noisy_world, tmp_path):
    records = [json.loads(line) for line in noisy_world["records"].read_text().splitlines()]
    lengths = [len(r["caption"]) for r in records]
    summary = run_recipe(tmp_path, noisy_world["records"],
                         [{"caption_length_filter": {"unit": "chars", "min": {"percentile": 10}, "max": "mean"}}])
    low, high = nearest_rank(lengths, 10), float(np.mean(lengths))
    expected_drop = {r["id"] for r in records if not low <= len(r["caption"]) <= high}
    entries = ledger(summary)
    assert {e["id"] for e in entries} == expected_drop and expected_drop
    for e in entries:
        assert e["op"] == "caption_length_filter" and e["stage"] == 1
        assert e["score"] == len(e["caption"])
        assert e["reason"] == ("caption_chars_below_min" if e["score"] < low else "caption_chars_above_max")
    stage = summary["stages"][0]
    assert stage["input"] == len(records) and stage["kept"] + stage["dropped"] == len(records)
    assert stage["info"]["bounds"]["caption_chars"]["min_value"] == low
    assert stage["info"]["bounds"]["caption_chars"]["max_value"] == pytest.approx(high)
    kept = [json.loads(line) for line in Path(summary["output"]["files"]["records"]).read_text().splitlines()]
    assert len(kept) == stage["kept"] and all(low <= len(r["caption"]) <= high for r in kept)
    for name in ("report.md", "funnel.png", "before_after.png", "scores_01_caption_length_filter.png"):
        assert (tmp_path / "out" / name).is_file(), name


def test_the_converters_cleaning_rules_run_as_curation_ops(noisy_world, tmp_path):
    """The cleaning ops decide in a recipe as in the converter: the image read back through its
    record, reject codes of REJECT_REASONS in the ledger, duplicate ids after their first row."""
    from paddle_caption.data.reject_reasons import REJECT_REASONS

    records = [json.loads(line) for line in noisy_world["records"].read_text().splitlines()]
    passing = [r for r in records if min(r["width"], r["height"]) >= 400 and "卡通风格" in r["caption"]]
    dataset = tmp_path / "with_dups.jsonl"  # three rows that pass the first two ops, repeated
    dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records + passing[:3]),
                       encoding="utf-8")
    summary = run_recipe(tmp_path, dataset, [
        {"image_validity_filter": {"min_side": 400, "verify": "full"}},
        {"style_phrase_filter": {"pattern": "卡通风格"}},
        {"duplicate_id_filter": {}},
        {"empty_caption_filter": {}},
        {"caption_length_outlier_filter": {"k": 1.5}}])
    small = {r["id"] for r in records if min(r["width"], r["height"]) < 400}
    reasons = {(e["id"], e["reason"]) for e in ledger(summary)}
    assert small and {rid for rid, reason in reasons if reason == "image_too_small"} == small
    assert {rid for rid, reason in reasons if reason == "no_style_phrase"} == {
        r["id"] for r in records if r["id"] not in small and "卡通风格" not in r["caption"]}
    assert all(reason in REJECT_REASONS for _, reason in reasons)
    assert sorted(rid for rid, reason in reasons if reason == "duplicate_id") == sorted(r["id"] for r in passing[:3])
    kept = [json.loads(line) for line in Path(summary["output"]["files"]["records"]).read_text().splitlines()]
    assert kept and len({r["id"] for r in kept}) == len(kept)
    lengths = [len(r["caption"]) for r in records if r["id"] not in small and "卡通风格" in r["caption"]]
    mean, std = float(np.mean(lengths)), float(np.std(lengths))
    assert all(mean - 1.5 * std <= len(r["caption"]) <= mean + 1.5 * std for r in kept)


def test_stages_resume_and_a_changed_op_reruns(noisy_world, tmp_path):
    process = [{"image_shape_filter": {"min_width": 400}}, {"caption_length_filter": {"unit": "words", "min": 15}}]
    first = run_recipe(tmp_path, noisy_world["records"], process)
    stage_dirs = sorted((tmp_path / "out" / "work").glob("0[12]_*"))
    stamps = [(d / "done.json").stat().st_mtime_ns for d in stage_dirs]
    again = run_recipe(tmp_path, noisy_world["records"], process)
    assert [(d / "done.json").stat().st_mtime_ns for d in stage_dirs] == stamps
    assert again["output"]["rows"] == first["output"]["rows"]
    changed = run_recipe(tmp_path, noisy_world["records"], [process[0], {"caption_length_filter": {"unit": "words", "min": 18}}])
    assert (stage_dirs[0] / "done.json").stat().st_mtime_ns == stamps[0]  # stage 1 reused
    assert changed["output"]["rows"] < first["output"]["rows"]


def test_filters_decide_on_the_stats_they_computed(noisy_world, tmp_path):
    summary = run_recipe(tmp_path, noisy_world["records"], [
        {"image_shape_filter": {"min_width": 350, "max_height": {"percentile": 90}}},
        {"image_aspect_ratio_filter": {"min": {"mean_std": -1}, "max": {"mean_std": 1}}},
        {"image_file_size_filter": {"max": {"percentile": 95}}},
        {"caption_length_filter": {"unit": "words", "min": "mean"}}])
    for entry in ledger(summary):
        stats = entry["stats"]
        if entry["op"] == "image_shape_filter":
            assert stats["image_width"] < 350 or entry["reason"] == "image_height_above_max"
        elif entry["op"] == "image_aspect_ratio_filter":
            assert entry["score"] == stats["aspect_ratio"]
    for stage in summary["stages"]:
        assert stage["dropped"] > 0, stage["op"]
    kept = list(iter_samples(tmp_path / "out" / "work" / next(
        p.name for p in (tmp_path / "out" / "work").iterdir() if p.name.startswith("04_")) / "kept.jsonl"))
    bound = summary["stages"][3]["info"]["bounds"]["caption_words"]["min_value"]
    assert all(s["stats"]["caption_words"] >= bound for s in kept)


def test_dedup_finds_near_duplicate_images_and_captions(noisy_world, tmp_path):
    summary = run_recipe(tmp_path, noisy_world["records"], [
        {"image_exact_dedup": {}}, {"image_near_dedup": {"hamming": 8, "hash_size": 16}},
        {"caption_exact_dedup": {"match": "caption"}}, {"caption_near_dedup": {"jaccard": 0.9}}])
    kinds = noisy_world["kinds"]
    near = [e for e in ledger(summary) if e["op"] == "image_near_dedup"]
    truth = {i for i, k in kinds.items() if k == "near_duplicate_image"}
    caught = {e["id"] for e in near} & truth
    assert len(caught) >= 0.8 * len(truth)
    assert len(near) - len(caught) <= 2  # almost no distinct image is taken for a copy
    for e in near:
        assert e["stats"]["duplicate_of"] and e["stats"]["phash_distance"] <= 8
    exact = [e for e in ledger(summary) if e["op"] == "caption_exact_dedup"]
    kept_captions = {s["caption"] for s in iter_samples(next((tmp_path / "out" / "work").glob("03_*")) / "kept.jsonl")}
    assert len(kept_captions) == summary["stages"][2]["kept"]
    assert all(e["caption"] in kept_captions for e in exact)


def _row_copy(tmp_path, row: dict, new_id: str, caption: str, name: str) -> dict:
    """`row`'s image bytes in a new TSV row of its own under another id and caption."""
    tsv = tmp_path / f"{name}.tsv"
    data = Path(row["tsv"]).read_bytes()[row["offset"]:row["offset"] + row["length"]]
    line = f"{new_id}\t".encode() + data.split(b"\t")[1] + f"\t{caption}\n".encode()
    tsv.write_bytes(line)
    return dict(row, id=new_id, caption=caption, tsv=str(tsv), offset=0, length=len(line) - 1)


def test_duplicates_are_pairs_of_image_and_caption(tmp_path, noisy_world):
    """Default (pair) mode: only a row whose image and caption both repeat a kept row's is dropped;
    the same caption on another image, or the same image with another caption, is kept. The
    one-sided modes, by name, drop those too."""
    rows = [json.loads(line) for line in noisy_world["records"].read_text().splitlines()]
    a, b = rows[0], next(r for r in rows[1:] if r["caption"] != rows[0]["caption"])
    rows = [a, b,
            _row_copy(tmp_path, b, "same_caption_other_image", a["caption"], "c0"),  # a's caption on b's image: kept
            _row_copy(tmp_path, a, "same_image_other_caption", b["caption"], "c1"),  # a second reference: kept
            _row_copy(tmp_path, a, "true_copy", a["caption"] + " ", "c2")]  # a's image and caption: dropped
    dataset = tmp_path / "records.jsonl"
    dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    every_op = [{"image_exact_dedup": {}}, {"image_near_dedup": {}}, {"caption_exact_dedup": {}},
                {"caption_near_dedup": {"jaccard": 0.9}}]
    summary = run_recipe(tmp_path, dataset, every_op)
    assert [(e["op"], e["id"], e["stats"]["duplicate_of"]) for e in ledger(summary)] == [
        ("image_exact_dedup", "true_copy", a["id"])]
    copies = ["same_caption_other_image", "same_image_other_caption", "true_copy"]  # (b's image, a's image)
    for name, op in [("image", "image_exact_dedup"), ("caption", "caption_exact_dedup")]:
        summary = run_recipe(tmp_path / name, dataset, [{op: {"match": name}}])
        assert sorted(e["id"] for e in ledger(summary)) == copies
    with pytest.raises(UserError, match="match must be one of pair, image"):
        run_recipe(tmp_path / "bad", dataset, [{"image_near_dedup": {"match": "caption"}}])


def test_band_index_finds_every_row_sharing_a_key():
    from paddle_caption.curate.index import BandIndex, Strings

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, size=(3000, 3)).astype(np.uint64)
    index = BandIndex(3, buffer=64)  # small buffer: many runs and merges
    for row, k in enumerate(keys):
        expected = np.flatnonzero((keys[:row] == k).any(axis=1))
        assert index.candidates([int(x) for x in k]).tolist() == expected.tolist()
        index.add([int(x) for x in k], row)
    assert len(index.runs[0]) <= 12  # log-structured: O(log n) runs
    strings = Strings()
    words = ["卡通风格。", "", "x" * 300, "背景是白色"]
    assert [strings.append(w) for w in words] == [0, 1, 2, 3]
    assert [strings[i] for i in range(4)] == words


def test_phash_is_imagehash_phash(noisy_world):
    import imagehash

    from PIL import Image

    from paddle_caption.curate.fingerprints import phash
    from paddle_caption.curate.samples import iter_record_samples, load_image

    for sample in list(iter_record_samples(noisy_world["records"]))[:20]:
        gray = load_image(sample).convert("L")
        for size in (8, 16):
            ours = int(phash(gray, size, resample=Image.LANCZOS), 16)
            theirs = int(str(imagehash.phash(gray, hash_size=size)), 16)
            assert bin(ours ^ theirs).count("1") <= 2  # the same bits but for a tie at the median


def test_exact_image_dedup_keeps_references_of_one_row(tmp_path, noisy_world):
    rows = [json.loads(line) for line in noisy_world["records"].read_text().splitlines()][:3]
    copy = dict(rows[0], id="copy_of_first")  # the same bytes under another id: a real duplicate...
    tsv = tmp_path / "copy.tsv"
    data = Path(rows[0]["tsv"]).read_bytes()[rows[0]["offset"]:rows[0]["offset"] + rows[0]["length"]]
    line = b"copy_of_first\t" + data.split(b"\t")[1] + b"\tx\n"
    tsv.write_bytes(line)
    copy.update(tsv=str(tsv), offset=0, length=len(line) - 1)
    reference = dict(rows[0], caption="another reference")  # ...the same row again: not a duplicate
    dataset = tmp_path / "records.jsonl"
    dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + [reference, copy]))
    summary = run_recipe(tmp_path, dataset, [{"image_exact_dedup": {"match": "image"}}])
    assert [(e["id"], e["stats"]["duplicate_of"]) for e in ledger(summary)] == [("copy_of_first", rows[0]["id"])]


def test_repeat_top_fills_the_quota_with_the_best_rows(tmp_path):
    from paddle_caption.curate.ops.repeat import RepeatTop, RepeatParams

    samples = [{"id": str(i), "caption": "c", "stats": {"consistency": float(i)}} for i in range(10)]
    op = RepeatTop(RepeatParams(quota=17, top_percent=30, max_copies=4), OpContext(work_dir=tmp_path))
    out = list(op.select(lambda: iter([dict(s, stats=dict(s["stats"])) for s in samples])))
    assert len(out) == 17 and all(reason is None for _, reason in out)
    ids = [s["id"] for s, _ in out]
    assert ids.count("7") == 4 and ids.count("8") == 3 and ids.count("9") == 3  # 7 extra over 3 rows
    assert all(ids.count(str(i)) == 1 for i in range(7))
    capped = RepeatTop(RepeatParams(quota=100, top_percent=10, max_copies=2), OpContext(work_dir=tmp_path))
    assert len(list(capped.select(lambda: iter(samples)))) == 11


def test_selection_streams(tmp_path):
    """A fixed-bound filter and a deduplicator decide row by row: they yield before the input ends."""
    from paddle_caption.curate.ops.base import RangeFilter, RangeParams

    def endless():
        i = 0
        while True:
            i += 1
            yield {"id": str(i), "caption": "x" * (i % 5), "stats": {"caption_sha1": str(i % 3), "caption_chars": i % 5}}

    dedup = build_op({"caption_exact_dedup": {"match": "caption"}}, OpContext(work_dir=tmp_path), "t")
    stream = dedup.select(endless)
    first = [next(stream) for _ in range(6)]
    assert [r for _, r in first] == [None, None, None, "duplicate_caption", "duplicate_caption", "duplicate_caption"]

    class Chars(RangeFilter):
        name, Params, stat = "chars", RangeParams, "caption_chars"

    chars = Chars(RangeParams(min=2), OpContext(work_dir=tmp_path))
    stream = chars.select(endless)
    below = "caption_chars_below_min"
    assert [r for _, r in (next(stream) for _ in range(5))] == [below, None, None, None, below]  # i % 5 chars


def test_proportional_quotas():
    assert proportional_quotas([50, 30, 20], 10) == [5, 3, 2]
    assert sum(proportional_quotas([7, 7, 7], 10)) == 10
    assert proportional_quotas([3, 100], 50) == [1, 49] or proportional_quotas([3, 100], 50) == [2, 48]
    assert proportional_quotas([2, 2], 10) == [2, 2]


# ---- data-juicer jsonl ----------------------------------------------------------------------------
def test_data_juicer_export_and_import_round_trip(noisy_world, tmp_path):
    from paddle_caption.curate.samples import image_bytes

    first = run_recipe(tmp_path / "a", noisy_world["records"], [{"caption_length_filter": {"min": 20}}],
                       export_data_juicer=True)
    exported = Path(first["output"]["files"]["data_juicer"])
    line = json.loads(exported.read_text().splitlines()[0])
    assert line["text"].startswith("<__dj__image> ") and line["images"][0].startswith("images/")
    assert "caption_chars" in line["__dj__stats__"]
    second = run_recipe(tmp_path / "b", exported, [{"caption_length_filter": {"min": 20}}],
                        dataset_format="data_juicer")
    a = list(iter_samples(tmp_path / "a" / "out" / "records.jsonl"))
    b = list(iter_samples(tmp_path / "b" / "out" / "records.jsonl"))
    assert [(r["id"], r["caption"]) for r in a] == [(r["id"], r["caption"]) for r in b]
    assert image_bytes(a[0]) == image_bytes(b[0]) and second["output"]["rows"] == len(a)


def test_curated_tsv_is_convertible(noisy_world, tmp_path):
    from paddle_caption.data.convert import RunOptions, convert

    summary = run_recipe(tmp_path, noisy_world["records"],
                         [{"caption_length_filter": {"min": 20}}, {"repeat_top": {"stat": "caption_chars", "times": 1.5}}],
                         export_tsv=True)
    converted = convert(summary["output"]["files"]["tsv"], tmp_path / "conv", opts=RunOptions(workers=1, progress=False))
    assert converted["kept"] == summary["output"]["rows"] and converted["rejected"] == 0


# ---- model operations (a micro model with the real vocabulary) ------------------------------------
@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    from .conftest import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("curate_model"))


def small_records(noisy_world, tmp_path, n=14) -> Path:
    path = tmp_path / "small.jsonl"
    path.write_text("".join(noisy_world["records"].read_text().splitlines(keepends=True)[:n]))
    return path


def test_consistency_is_the_image_gain_and_sharded_equals_single(noisy_world, micro_model, tmp_path):
    """Rank 1 of 2 in another process (as under paddle.distributed.launch), rank 0 here: the merged
    statistics equal a one-process run's (the reference images do not depend on the shard); each
    row's consistency is logp_image - logp_other_images."""
    dataset = small_records(noisy_world, tmp_path)
    process = [{"consistency_filter": {"min": {"percentile": 25}}}]
    single = run_recipe(tmp_path / "one", dataset, process, model_dir=str(micro_model), batch_size=4)
    recipe = tmp_path / "two.json"
    recipe.write_text(json.dumps({"dataset": str(dataset), "export_dir": str(tmp_path / "two" / "out"),
                                  "model_dir": str(micro_model), "batch_size": 4, "num_threads": 1,
                                  "process": process}))
    other = subprocess.Popen([sys.executable, "-m", "paddle_caption", "curate", str(recipe), "--rank", "1",
                              "--world_size", "2", "--no_progress"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sharded = curate(load_recipe(recipe), rank=0, world_size=2, progress=False, log=lambda *a: None)
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0, out
    one = list(iter_samples(next((tmp_path / "one" / "out" / "work").glob("01_*")) / "stats.jsonl"))
    two = list(iter_samples(next((tmp_path / "two" / "out" / "work").glob("01_*")) / "stats.jsonl"))
    assert [s["id"] for s in one] == [s["id"] for s in two]
    for a, b in zip(one, two):
        for key in ("consistency", "logp_image", "logp_other_images"):
            assert abs(a["stats"][key] - b["stats"][key]) < 1e-4, key
        assert a["stats"]["consistency"] == pytest.approx(a["stats"]["logp_image"] - a["stats"]["logp_other_images"], abs=2e-6)
        assert a["stats"]["logp_image"] < 0 and a["stats"]["logp_other_images"] < 0
    cut = nearest_rank([s["stats"]["consistency"] for s in one], 25)
    assert sharded["output"]["rows"] == single["output"]["rows"] == sum(s["stats"]["consistency"] >= cut for s in one)


def test_consistency_baselines_reference_images_and_ablation(noisy_world, micro_model, tmp_path):
    """other_images: a caption's baseline is its mean log-prob under its row's images from the
    stage's evenly spaced reference pool, never its own; ablated: under zeros in the image rows."""
    from paddle_caption.curate.ops.consistency import References, pick_references, score_samples
    from paddle_caption.curate.samples import iter_record_samples, load_image
    from paddle_caption.curate.scoring import caption_logprobs, image_features
    from paddle_caption.predict.predictor import load_predictor

    samples = list(iter_record_samples(small_records(noisy_world, tmp_path, n=12)))
    refs = pick_references(iter(samples), len(samples), 3)
    assert [s["id"] for s in refs] == [samples[2]["id"], samples[6]["id"], samples[10]["id"]]
    no_caption = [{**s, "caption": ""} if i == 2 else s for i, s in enumerate(samples)]
    assert pick_references(iter(no_caption), 12, 3)[0]["id"] == samples[3]["id"]  # the next usable row

    predictor = load_predictor(micro_model)
    references = References([s["id"] for s in refs],
                            image_features(predictor, [predictor.preprocess(load_image(s)) for s in refs]), k=3)
    rows = samples[:3]  # row 2 is a reference itself
    images = [predictor.preprocess(load_image(s)) for s in rows]
    captions = [s["caption"] for s in rows]
    scored = [{"id": s["id"], "stats": {}} for s in rows]
    gains = score_samples(predictor, scored, captions, images, references=references)
    own = caption_logprobs(predictor, images, captions)
    for i, sample in enumerate(scored):
        others = [predictor.preprocess(load_image(s)) for s in refs if s["id"] != rows[i]["id"]]
        assert len(others) == (2 if i == 2 else 3)
        expected = caption_logprobs(predictor, others, [captions[i]] * len(others)).mean()
        assert sample["stats"]["logp_other_images"] == pytest.approx(expected, abs=2e-6)
        assert gains[i] == pytest.approx(own[i] - expected, abs=1e-9)

    ablated = [{"id": s["id"], "stats": {}} for s in rows]
    gains = score_samples(predictor, ablated, captions, images)
    blind = caption_logprobs(predictor, images, captions, ablated=True)
    assert not np.allclose(blind, own)
    assert gains == pytest.approx(own - blind, abs=1e-9)
    assert all("logp_text" in s["stats"] and "logp_other_images" not in s["stats"] for s in ablated)


def test_reference_draw_depends_only_on_the_row_id():
    from paddle_caption.curate.ops.consistency import References

    pool = References([f"r{j}" for j in range(10)], [None] * 10, k=4)
    draws = {row: pool.for_row(row) for row in ("a", "b", "c", "r3")}
    assert all(len(d) == 4 and len(set(d)) == 4 for d in draws.values())
    assert draws == {row: References(pool.ids, pool.features, 4).for_row(row) for row in draws}  # no state
    assert 3 not in draws["r3"]  # never its own image
    assert len({tuple(d) for d in draws.values()}) > 1  # rows see different images
    assert References(["x", "y"], [None] * 2, k=4).for_row("x") == [1]  # a small pool: all the others


def test_consistency_baseline_is_checked(noisy_world, tmp_path):
    dataset = small_records(noisy_world, tmp_path, n=4)
    for params, message in (({"baseline": "text"}, "baseline is one of other_images, ablated"),
                            ({"baseline_images": 0}, "baseline_images must be >= 1"),
                            ({"baseline_images": 8, "reference_pool": 8}, "below reference_pool")):
        with pytest.raises(UserError, match=message):
            run_recipe(tmp_path, dataset, [{"consistency_filter": {"min": 0, **params}}], model_dir="m")


def test_model_stage_resumes_inside_its_shard(noisy_world, micro_model, tmp_path):
    """A killed model stage keeps the complete batches of its shard file and computes only the rest."""
    dataset = small_records(noisy_world, tmp_path, n=9)
    process = [{"consistency_filter": {"min": -100}}]
    full = run_recipe(tmp_path / "full", dataset, process, model_dir=str(micro_model), batch_size=4)
    stats = next((tmp_path / "full" / "out" / "work").glob("01_*")) / "stats.jsonl"
    lines = stats.read_text().splitlines(keepends=True)
    # the interrupted run: its stage directory holds 4 complete lines and a torn one
    run = CurationRun(Recipe(dataset=str(dataset), export_dir=str(tmp_path / "cut" / "out"), process=process,
                             model_dir=str(micro_model), batch_size=4).validate("t"), progress=False, log=lambda *a: None)
    run.input_stage()
    stage = run.stage_dir(1)
    stage.mkdir(parents=True)
    marked = [json.dumps({**json.loads(x), "caption": json.loads(x)["caption"] + "(resumed)"}, ensure_ascii=False) + "\n"
              for x in lines[:4]]
    header = json.dumps({"format": shards.FORMAT, "fingerprint": stage.name}) + "\n"
    shards.shard_path(stage / "stats.jsonl", 0, 1).write_text(header + "".join(marked) + lines[4][:20])
    run.run()
    resumed = list(iter_samples(stage / "stats.jsonl"))
    assert len(resumed) == 9 and sum(s["caption"].endswith("(resumed)") for s in resumed) == 4
    assert [s["id"] for s in resumed] == [json.loads(x)["id"] for x in lines]
    assert full["output"]["rows"] == 9


def test_pseudo_labels_and_clusters_with_a_model(noisy_world, micro_model, tmp_path):
    dataset = small_records(noisy_world, tmp_path, n=16)
    summary = run_recipe(tmp_path, dataset, [
        {"consistency_filter": {"min": -100}},
        {"pseudo_label": {"unlabeled_tsv": str(noisy_world["unlabeled"]), "num_candidates": 2,
                          "strategy": "sample", "max_new_tokens": 6, "recaption_below": {"percentile": 20}}},
        {"cluster_select": {"n_clusters": 3, "target": 12, "near": 0.25, "far": 0.25}}],
        model_dir=str(micro_model), batch_size=5)
    pseudo = summary["stages"][1]
    assert pseudo["input"] == 16 + 6  # the pool joins the data
    rows = [json.loads(line) for line in Path(summary["output"]["files"]["records"]).read_text().splitlines()]
    stats = list(iter_samples(next((tmp_path / "out" / "work").glob("02_*")) / "stats.jsonl"))
    unlabeled = [s for s in stats if s["id"].startswith("unlabeled_")]
    recaptioned = [s for s in stats if "original_caption" in s["stats"]]
    assert len(unlabeled) == 6 and all(s["synthetic"] and s["stats"]["candidates"] == 2 for s in unlabeled)
    assert all(s["width"] >= 320 for s in unlabeled)  # the image's size, read when it was captioned
    assert recaptioned and all(s["synthetic"] for s in recaptioned)
    assert all(s["stats"]["consistency"] == pytest.approx(s["stats"]["logp_image"] - s["stats"]["logp_other_images"], abs=2e-6)
               for s in unlabeled)
    cluster = summary["stages"][2]
    assert cluster["kept"] == 12 and sum(cluster["info"]["quotas"]) == 12
    assert sum(cluster["info"]["sizes"]) == cluster["input"]
    assert len(rows) == 12 and all("vision_features" not in json.dumps(r) for r in rows)
    synthetic = [r for r in rows if r.get("synthetic")]
    assert all(r["synthetic"] is True for r in synthetic)


@pytest.mark.slow
def test_consistency_sign_with_a_trained_model(tmp_path):
    """A micro model trained briefly on clean synthetic ads: on held-out images, a matched caption
    is clearly more likely under its image than under the reference images, and another image's
    caption is not (its gain stays near zero: its image is just one more unrelated image)."""
    from paddle_caption.curate.ops.consistency import References, score_samples
    from paddle_caption.curate.samples import iter_record_samples, load_image
    from paddle_caption.curate.scoring import image_features
    from paddle_caption.data.convert import RunOptions, convert
    from paddle_caption.data.synthetic import write_dataset
    from paddle_caption.predict.predictor import load_predictor
    from paddle_caption.train.config import TrainConfig
    from paddle_caption.train.cli import merge_main
    from paddle_caption.train.trainer import Trainer

    from .conftest import micro_model_json

    write_dataset(tmp_path / "data", 400, 40, 0, seed=7, workers=1, progress=False)
    for split in ("train", "val"):
        convert(tmp_path / "data" / f"{split}.tsv", tmp_path / split, opts=RunOptions(workers=1, progress=False))
    model_json = micro_model_json(tmp_path, visual={"image_size": 112})
    cfg = {"model_config": str(model_json), "train_records": str(tmp_path / "train" / "records.jsonl"),
           "learning_rate": 1e-2, "per_device_train_batch_size": 8, "max_steps": 300, "num_workers": 0,
           "num_threads": 1, "output_dir": str(tmp_path / "run"), "progress": False, "warmup_ratio": 0.03,
           "weight_decay": 0.0, "frozen": ["visual.*"], "logging_steps": 50}
    Trainer(TrainConfig.from_dict(cfg).validate(), log=lambda *_: None).train()
    assert merge_main(["--model_name_or_path", str(model_json), "--local_path", str(tmp_path / "run" / "final"),
                       "--merge_model_path", str(tmp_path / "model")]) == 0
    predictor = load_predictor(tmp_path / "model")
    samples = list(iter_record_samples(tmp_path / "val" / "records.jsonl"))
    images = [predictor.preprocess(load_image(s)) for s in samples]
    references = References([s["id"] for s in samples[::4]], image_features(predictor, images[::4]), k=4)
    ids = [{"id": s["id"], "stats": {}} for s in samples]
    matched = score_samples(predictor, ids, [s["caption"] for s in samples], images, references=references)
    rotated = [samples[(i + 7) % len(samples)]["caption"] for i in range(len(samples))]
    ids = [{"id": s["id"], "stats": {}} for s in samples]
    mismatched = score_samples(predictor, ids, rotated, images, references=references)
    # measured: 0.53 vs 0.03, 80% of the images
    assert matched.mean() > 0.25 and mismatched.mean() < matched.mean() / 4
    assert (matched > mismatched).mean() >= 0.65  # per image, well above chance


def test_example_recipe_parses(tmp_path):
    """The packaged example recipe: every op and parameter is known (paths aside)."""
    data = json.loads((ROOT / "config" / "curate" / "example.json").read_text())
    pool = tmp_path / "pool.tsv"
    pool.write_text("")
    ctx = OpContext(work_dir=tmp_path)
    for i, entry in enumerate(data["process"]):
        (name, params), = entry.items()
        if "unlabeled_tsv" in params:
            params = {**params, "unlabeled_tsv": str(pool)}
        assert build_op({name: params}, ctx, f"process[{i}]").name == name


@pytest.mark.slow
def test_curate_demo_end_to_end_small(tmp_path):
    """The curation demo's pipeline on a few rows and steps: every stage runs and reports; a rerun
    finds everything done."""
    out = tmp_path / "cdemo"
    cmd = [sys.executable, "tools/run_curate_demo.py", "--out", str(out), "--train", "60", "--val", "8",
           "--test", "8", "--unlabeled", "6", "--seed-steps", "4", "--max-steps", "4", "--minutes", "2",
           "--max-new-tokens", "12", "--batch-size", "4", "--rounds", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["runs"]) == {"raw", "curated"}
    assert [s["op"] for s in result["curation"]["stages"]] == ["image_near_dedup", "caption_length_filter",
                                                              "consistency_filter", "pseudo_label", "repeat_top"]
    assert result["round1_detection"]["scored"] == result["detection"]["scored"]  # the same rows, rescored
    detection = result["detection"]
    assert detection["scored"] == sum(d["total"] for d in detection.values() if isinstance(d, dict))
    assert "precision" in detection["mismatched_caption"] and result["compute"]["total_cpu_min"] > 0
    for name in ("results.md", "recipe_curated_data.json", "recipe_round1.json", "curated_data/records.jsonl",
                 "curated_data/ledger.jsonl",
                 "curated_data/report.md", "curated_data/funnel.png", "raw/results.txt", "curated/results.txt"):
        assert (out / name).is_file(), name
    curated = [json.loads(line) for line in (out / "curated_data" / "records.jsonl").read_text().splitlines()]
    assert any(r.get("synthetic") for r in curated)
    assert "(b) curated rows" in done.stdout and "precision on mismatched captions" in done.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(kept)" in again.stdout


def test_curate_demo_seeds_name_the_runs_and_summarise_mean_and_std():
    import statistics

    from paddle_caption.demo.curate_demo import RUNS, CurateDemo, CurateDemoOptions
    from paddle_caption.demo.seeds import seed_summary, seed_table

    demo = CurateDemo(CurateDemoOptions(train_seeds=3), log=lambda *a: None)
    assert demo.runs() == {"raw": ("raw", 0), "curated": ("curated", 0), "raw_seed1": ("raw", 1),
                           "curated_seed1": ("curated", 1), "raw_seed2": ("raw", 2), "curated_seed2": ("curated", 2)}
    assert demo.labels()["curated_seed2"] == "(b) curated rows, seed 2"
    assert CurateDemo(CurateDemoOptions(), log=lambda *a: None).labels() == {"raw": "(a) raw noisy rows",
                                                                             "curated": "(b) curated rows"}

    def row(cider, style):
        fields = {"background": 0.9, "style": style, "colour": 0.5, "shape": 0.2, "exact": 0.05}
        return {"scores": {"CIDEr-D": cider, "BLEU-4": 0.5, "ROUGE-L": 0.8, "fields": fields}}

    seeds = seed_summary({"raw": [row(3.6, 0.4), row(4.0, 0.5), row(3.8, 0.6)], "curated": [row(4.1, 0.7)] * 3})
    assert seeds["raw"]["CIDEr-D"]["mean"] == pytest.approx(3.8)
    assert seeds["raw"]["CIDEr-D"]["std"] == pytest.approx(statistics.stdev([3.6, 4.0, 3.8]))
    assert seeds["curated"]["style"] == {"values": [0.7] * 3, "mean": pytest.approx(0.7), "std": 0.0}
    table = seed_table(seeds, 3, RUNS)
    assert "(a) raw noisy rows, mean ± std over 3 seeds | 3.800 ± 0.200" in table and "70.0% ± 0.0%" in table


def test_filter_detection_counts_only_the_rows_the_filter_scored(tmp_path):
    from paddle_caption.demo.curate_demo import filter_detection

    noise = tmp_path / "noise.tsv"
    noise.write_text("m1\tmismatched_caption\tx\nm2\tmismatched_caption\tx\nm3\tmismatched_caption\tx\n"
                     "w1\twrong_colour\tx\nd1\tnear_duplicate_image\tc1\n")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": i}) + "\n" for i in ("c1", "c2", "c3", "m1", "m2", "m3", "w1", "d1")))
    ledger_path = tmp_path / "ledger.jsonl"
    ledger_path.write_text("".join(json.dumps(e) + "\n" for e in [
        {"stage": 1, "op": "image_near_dedup", "id": "d1"},
        {"stage": 2, "op": "consistency_filter", "id": "m1"}, {"stage": 2, "op": "consistency_filter", "id": "m2"},
        {"stage": 2, "op": "consistency_filter", "id": "w1"}, {"stage": 2, "op": "consistency_filter", "id": "c2"}]))
    got = filter_detection(ledger_path, noise, records)
    assert got["scored"] == 7 and got["dropped"] == 4
    assert got["mismatched_caption"] == {"total": 3, "caught": 2, "recall": 2 / 3, "precision": 0.5}
    assert got["clean"]["caught"] == 1 and got["any_noise_precision"] == 0.75
    assert "near_duplicate_image" not in got


def test_model_stages_on_an_exported_model_match_the_checkpoint(noisy_world, micro_model, tmp_path):
    """Image features (cluster_select) on Paddle Inference select the checkpoint's rows; the ops that
    score captions with the training forward (consistency, pseudo_label) are refused in one line."""
    from paddle_caption.deploy.export import export_model
    from paddle_caption.runtime import UserError

    exported = tmp_path / "export"
    export_model(micro_model, exported, "float32")
    dataset = small_records(noisy_world, tmp_path, n=12)
    process = [{"cluster_select": {"n_clusters": 3, "target": 8, "near": 0.25, "far": 0.25}}]
    outputs = {}
    for name, model_dir, engine in (("dygraph", micro_model, ""), ("inference", exported, "inference")):
        summary = run_recipe(tmp_path / name, dataset, process, model_dir=str(model_dir), batch_size=4, engine=engine)
        outputs[name] = Path(summary["output"]["files"]["records"]).read_text()
    assert outputs["inference"] == outputs["dygraph"] and outputs["dygraph"].count("\n") == 8
    for op in ({"consistency_filter": {"min": -100}},
               {"pseudo_label": {"unlabeled_tsv": str(noisy_world["unlabeled"]), "num_candidates": 1,
                                 "strategy": "beam", "max_new_tokens": 4}}):
        with pytest.raises(UserError, match="training forward.*engine dygraph"):
            run_recipe(tmp_path / "refused", dataset, [op], model_dir=str(exported), batch_size=4)
    with pytest.raises(UserError, match="engine must be dygraph or inference"):
        run_recipe(tmp_path / "bad", dataset, process, engine="onnx")


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_identical_output(noisy_world, tmp_path, monkeypatch):
    """A run killed inside a dedup stage's decision (after writing part of it) resumes and writes the
    same bytes as an uninterrupted run."""
    from paddle_caption.curate.ops import dedup

    process = [{"caption_length_filter": {"unit": "words", "min": {"percentile": 1}}}, {"image_exact_dedup": {}},
               {"image_near_dedup": {"hamming": 8}}, {"caption_near_dedup": {"jaccard": 0.95}}]
    reference = run_recipe(tmp_path / "ref", noisy_world["records"], process)
    select = dedup.ImageNearDedup.select

    def crashing(self, read):
        for i, item in enumerate(select(self, read)):
            if i == 40:
                raise KeyboardInterrupt  # as a kill: the stage's files are left half written
            yield item

    monkeypatch.setattr(dedup.ImageNearDedup, "select", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path / "run", noisy_world["records"], process)
    monkeypatch.setattr(dedup.ImageNearDedup, "select", select)
    resumed = run_recipe(tmp_path / "run", noisy_world["records"], process)
    for key in ("records", "ledger"):
        assert Path(resumed["output"]["files"][key]).read_bytes() == Path(reference["output"]["files"][key]).read_bytes()
    assert [s["kept"] for s in resumed["stages"]] == [s["kept"] for s in reference["stages"]]


@pytest.mark.slow
def test_a_sigkilled_process_resumes_with_identical_output(noisy_world, tmp_path):
    """tools/curate.py SIGKILLed in the middle of its stages (no Python cleanup runs: half-written temp
    files, a stage without its done.json) and started again until it finishes writes the same bytes as
    a run never killed."""
    import os
    import signal
    import time

    rows = [json.loads(line) for line in noisy_world["records"].read_text().splitlines()]
    source = Path(rows[0]["tsv"]).read_bytes()
    tsv, dataset = tmp_path / "train.tsv", tmp_path / "records.jsonl"
    with open(tsv, "wb") as out_tsv, open(dataset, "w", encoding="utf-8") as out_records:
        for k in range(10):  # 10 copies of each row under new ids: a run of a few seconds
            for r in rows:
                line = source[r["offset"]:r["offset"] + r["length"]].replace(r["id"].encode(), f"{r['id']}_{k}".encode(), 1)
                record = {**r, "id": f"{r['id']}_{k}", "tsv": str(tsv), "offset": out_tsv.tell(), "length": len(line)}
                out_tsv.write(line + b"\n")
                out_records.write(json.dumps(record, ensure_ascii=False) + "\n")
    process = [{"image_shape_filter": {"min_width": 64, "max_width": {"percentile": 99.9}}},
               {"caption_length_filter": {"unit": "words", "min": {"percentile": 1}, "max": {"mean_std": 3}}},
               {"image_exact_dedup": {"match": "image"}}, {"image_near_dedup": {"hamming": 8}},
               {"caption_near_dedup": {"jaccard": 0.95}}]
    reference = run_recipe(tmp_path / "ref", dataset, process)
    out = tmp_path / "killed"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"dataset": str(dataset), "export_dir": str(out), "process": process}))
    cmd = [sys.executable, str(ROOT / "tools/curate.py"), str(recipe), "--no_progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for stage in ("03_", "05_"):  # killed as soon as that stage has begun
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(stage) for p in (out / "work").glob("*")):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        assert not (out / "summary.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for key in ("records", "ledger"):
        assert (out / f"{key}.jsonl").read_bytes() == Path(reference["output"]["files"][key]).read_bytes()
    assert not list(out.rglob("*.tmp"))  # the killed runs' half-written files were cleaned up


@pytest.mark.slow
def test_dedup_statistics_sharded_equal_one_process(noisy_world, tmp_path):
    """Under a launch the dedup ops' statistics are split across the ranks; the output is the same bytes."""
    import threading

    process = [{"image_exact_dedup": {}}, {"image_near_dedup": {"hamming": 8}}, {"caption_near_dedup": {"jaccard": 0.9}}]
    single = run_recipe(tmp_path / "one", noisy_world["records"], process)
    recipe = Recipe(dataset=str(noisy_world["records"]), export_dir=str(tmp_path / "two"), process=process)
    other = threading.Thread(target=curate, args=(recipe.validate("test"),),
                             kwargs={"rank": 1, "world_size": 2, "progress": False, "log": lambda *a: None})
    other.start()
    sharded = curate(recipe, rank=0, world_size=2, progress=False, log=lambda *a: None)
    other.join(60)
    assert [s["world_size"] for s in sharded["stages"]] == [2, 2, 2]
    for key in ("records", "ledger"):
        assert Path(sharded["output"]["files"][key]).read_bytes() == Path(single["output"]["files"][key]).read_bytes()
