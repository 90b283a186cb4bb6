"""Why a row or an image is refused: the one table of reject codes.

Every place that refuses input names one of these codes: the converter's rejects.tsv and summary
(in this order, the order rows are checked: the first failing check is a row's reason), curation's
ledger for its cleaning operations, prediction's RESULTS.txt.rejects and the service's 400 errors.
`rule` says what the check is (the converter's --help and docs); `summary` is a few words for a
message to the person who sent the input.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RejectReason:
    rule: str
    summary: str


REJECT_REASONS: dict[str, RejectReason] = {
    "row_too_long": RejectReason("row longer than --max-row-bytes (never read into memory)", "row too long"),
    "invalid_utf8": RejectReason("row is not valid UTF-8", "not UTF-8 text"),
    "wrong_column_count": RejectReason("row does not have exactly three tab-separated columns",
                                       "wrong number of columns"),
    "empty_id": RejectReason("id column is empty", "empty id"),
    "empty_caption": RejectReason("caption is empty", "empty caption"),
    "no_style_phrase": RejectReason("caption has no phrase matching the style pattern (default \\S+风格)",
                                    "caption names no style"),
    "bad_base64": RejectReason("image column is not strict base64", "not valid base64"),
    "empty_image": RejectReason("image column is empty", "empty image"),
    "too_many_pixels": RejectReason("a decompression bomb: the header declares more than --max-pixels pixels, or (above "
                                    "16.7 MP) more than --max-compression-ratio RGB bytes per payload byte (never decoded)",
                                    "image has too many pixels"),
    "undecodable_image": RejectReason("payload is not an image PIL can decode completely", "not a decodable image"),
    "image_too_small": RejectReason("image side shorter than --min-side", "image too small"),
    "duplicate_id": RejectReason("id of an earlier kept row (the first one is kept)", "repeated id"),
    "no_reference": RejectReason("image without a caption in --captions (MUGE layout)", "no reference caption"),
    "caption_length_outlier": RejectReason("caption length outside mean +- K*std of kept captions (--ksigma)",
                                           "caption length is an outlier"),
}
