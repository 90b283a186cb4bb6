"""Score a predictions file against a references file: CIDEr-D, BLEU-1..4, ROUGE-L (+ field accuracy).

    python tools/evaluate.py RESULTS.txt REFS.tsv [--mode jieba|char] [--json OUT.json] [--fields]

RESULTS.txt has one `id \\t caption` line per image (the caption may be empty). REFS.tsv has
`id \\t caption` lines, an id repeating once per reference, or the 3-column contest rows
`id \\t base64 \\t caption` (the caption is the last column); or REFS is a MUGE `IC_*.jsonl`
(`{"image_id", "text": [captions]}`), every caption a reference. Every id must be in both files.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..data.contest_tsv import iter_text_rows, normalize_id, read_muge_captions
from ..runtime import UserError
from .fields import FIELD_KEYS, field_accuracy
from .caption_scores import MODES, score_captions

METRIC_KEYS = ("CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L")
# A "caption" this long made only of base64 characters is an image payload: the user passed a
# 2-column test split (id, base64) as references.
_BASE64_RE = re.compile(r"[A-Za-z0-9+/=]{512,}")


def read_results(path: str | Path) -> dict[str, str]:
    """id -> predicted caption from `id \\t caption` lines; duplicate ids are an error."""
    path = Path(path)
    results: dict[str, str] = {}
    for lineno, cols in iter_text_rows(path, "results file"):
        if len(cols) != 2 or not normalize_id(cols[0]):
            raise UserError(f"{path}:{lineno}: expected 'id<TAB>caption', got {len(cols)} column(s)"
                            + ("" if normalize_id(cols[0]) else " with an empty id"))
        key = normalize_id(cols[0])
        if key in results:
            raise UserError(f"{path}:{lineno}: duplicate id {key!r} in results")
        results[key] = cols[1].strip()
    if not results:
        raise UserError(f"{path}: no predictions")
    return results


def read_references(path: str | Path) -> dict[str, list[str]]:
    """id -> reference captions from `id \\t caption` or `id \\t base64 \\t caption` lines, or a MUGE jsonl."""
    path = Path(path)
    if path.suffix == ".jsonl":
        refs = {k: [c for c in v if c] for k, v in read_muge_captions(path, "references file").items()}
        empty = [k for k, v in refs.items() if not v]
        if empty:
            raise UserError(f"{path}: image {empty[0]!r} has no non-empty reference caption")
        if not refs:
            raise UserError(f"{path}: no references")
        return refs
    refs: dict[str, list[str]] = {}
    for lineno, cols in iter_text_rows(path, "references file"):
        if len(cols) not in (2, 3) or not normalize_id(cols[0]):
            raise UserError(f"{path}:{lineno}: expected 'id<TAB>caption' or 'id<TAB>base64<TAB>caption', "
                            f"got {len(cols)} column(s)" + ("" if normalize_id(cols[0]) else " with an empty id"))
        caption = cols[-1].strip()
        if not caption:
            raise UserError(f"{path}:{lineno}: empty reference caption")
        if _BASE64_RE.fullmatch(caption):
            raise UserError(f"{path}:{lineno}: the caption column holds base64 image data; "
                            "a test split has no captions to score against")
        refs.setdefault(normalize_id(cols[0]), []).append(caption)
    if not refs:
        raise UserError(f"{path}: no references")
    return refs


def _check_ids(results: dict, refs: dict, results_path: Path, refs_path: Path) -> None:
    def listing(ids):
        ids = sorted(ids)
        return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")

    missing = set(refs) - set(results)
    if missing:
        raise UserError(f"{len(missing)} ids of {refs_path} have no prediction in {results_path} "
                        f"(first: {listing(missing)})")
    extra = set(results) - set(refs)
    if extra:
        raise UserError(f"{len(extra)} ids of {results_path} have no reference in {refs_path} "
                        f"(first: {listing(extra)})")


def evaluate_files(results_path: str | Path, refs_path: str | Path, mode: str = "jieba",
                   fields: bool = False) -> dict:
    """Scores as a dict: CIDEr-D, BLEU-1..4, ROUGE-L (floats), n, mode, and `fields` if asked.

    Raises UserError on unreadable or inconsistent files (see the module docstring).
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    results_path, refs_path = Path(results_path), Path(refs_path)
    results = read_results(results_path)
    refs = read_references(refs_path)
    _check_ids(results, refs, results_path, refs_path)

    scores = score_captions(results, refs, mode=mode)
    scores["mode"] = mode
    if fields:
        multi = sum(len(r) > 1 for r in refs.values())
        if multi:
            raise UserError(f"--fields needs one reference per id; {multi} ids of {refs_path} have several")
        try:
            scores["fields"] = field_accuracy(results, {k: r[0] for k, r in refs.items()})
        except ValueError as err:
            raise UserError(f"{refs_path}: {err}") from None
    return scores


def format_table(scores: dict) -> str:
    """A two-column `metric | value` table; fractions and scores with 4 decimals."""
    rows = [(key, f"{scores[key]:.4f}") for key in METRIC_KEYS]
    rows.append(("images", str(scores["n"])))
    fields = scores.get("fields")
    if fields:
        for key in FIELD_KEYS:
            value = fields[key]
            rows.append((f"field {key}", "n/a" if value is None else f"{value:.4f}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}} | value", f"{'-' * width}-|-------"]
    lines += [f"{name:<{width}} | {value}" for name, value in rows]
    return "\n".join(lines)


def default_json_path(results_path: str | Path) -> Path:
    """RESULTS.txt -> RESULTS.scores.json, beside it."""
    results_path = Path(results_path)
    return results_path.with_name(f"{results_path.stem}.scores.json")
