"""The synthetic ad-image world (spec v1: "Synthetic ad-image world", synthetic_ads.md).

Every image is a flat background with one or two coloured shapes drawn in one of six styles, and its
caption names exactly those fields, so a model trained on it can be scored field by field. The
generator writes contest-format TSV splits; the training split also gets ~8% deliberately dirty rows
so that the cleaning step has work to do.

Noise (optional, off by default; the project copy of the spec, docs/synthetic_ads.md, "Noise"): for data curation, a share of
the clean training rows can carry a caption of another image, a wrong style or colour word, a
truncated caption, or a near-duplicate of an earlier row's image; and an unlabeled pool of images
can be written. Which rows are noisy, and how, goes to `train_noise.tsv` (the ground truth for a
filter's precision and recall), never into the training files.

Determinism: each row draws from its own RNG seeded by (seed, split, index), and the dirty and noisy
rows are planned up front from (seed, split), so the files are byte-identical for the same seed,
counts and noise shares whatever the number of worker processes.

Layout, one job per module:
- `world.py`: the vocabulary and the caption grammar (format, parse, sample);
- `render.py`: drawing an image from its fields, and its JPEG;
- `rows.py`: row ids and seeds, the dirty and noisy rows planned up front, and how each is spoilt;
- `writer.py`: rendering a split in a process pool and writing the TSV files;
- `cli.py`: `make-data` (tools/make_demo_data.py).

The names other packages use are importable from here.
"""
from .render import encode_jpeg, render_ad
from .rows import DIRTY_KINDS, NOISE_KINDS, SPLITS, NoiseConfig, SyntheticRow, plan_dirty_rows, plan_noise_rows, row_id
from .world import (BACKGROUNDS, COLOURS, LINE_ART, LINE_ART_BACKGROUND, SHAPES, STYLES, CaptionFields, format_caption,
                    parse_caption, sample_fields)
from .writer import generate_split, write_dataset

__all__ = ["BACKGROUNDS", "COLOURS", "DIRTY_KINDS", "LINE_ART", "LINE_ART_BACKGROUND", "NOISE_KINDS", "SHAPES",
           "SPLITS", "STYLES", "CaptionFields", "NoiseConfig", "SyntheticRow", "encode_jpeg", "format_caption",
           "generate_split", "parse_caption", "plan_dirty_rows", "plan_noise_rows", "render_ad", "row_id",
           "sample_fields", "write_dataset"]
