"""Data: from the contest's TSV to training samples.

- `contest_tsv.py`: the contest file layouts (rows, CRLF, ids, column errors) and MUGE ECommerce-IC's
  captions jsonl — every reader uses it;
- `images.py`: image decoding, verification, preprocessing, and the image limits every entry point
  applies (`MIN_IMAGE_SIDE`, `MAX_IMAGE_PIXELS`); `reject_reasons.py`: the one table of reject codes;
- `clean_rules.py`: the switches of the cleaning rules and the default recipe of curation's cleaning
  operations they make; `convert.py`: the resumable engine of `convert_labels.py` that runs it
  (`convert_ranges.py` its workers, `convert_input.py` its input checks); `cli.py`: its command line;
- `records.py`: records.jsonl, pointers into the source TSV: the one record schema;
- `prompts.py` / `samples.py`: the prompt template and Qwen-VL's ChatML training samples;
- `dataset.py`: dataset, collator, length-grouped and per-rank batch samplers, the DataLoader;
- `distribution.py`: statistics of a column of numbers (length histograms, moments, exact streaming
  quantiles), the one module that computes them for analysis, conversion and curation;
- `stats.py` / `analyze.py`: dataset statistics, and their plots and report;
- `synthetic/`: the synthetic ad world the embedded default trains on (and its optional noise),
  one job per module (`world`, `render`, `rows`, `writer`, `cli`).

Data curation (filters, dedup, consistency, pseudo-labels) is the `paddle_caption.curate` package.
"""
