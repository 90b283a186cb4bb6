"""Data: from the contest's TSV to training samples.

- `contest_tsv.py`: the contest file layouts (rows, CRLF, ids, column errors) and MUGE ECommerce-IC's
  captions jsonl — every reader uses it;
- `images.py`: image decoding, verification, preprocessing;
- `clean_rules.py` / `convert.py`: the cleaning rules and the resumable engine of `convert_labels.py`;
- `records.py`: records.jsonl, pointers into the source TSV;
- `prompts.py` / `samples.py`: the prompt template and Qwen-VL's ChatML training samples;
- `dataset.py`: dataset, collator, length-grouped and per-rank batch samplers, the DataLoader;
- `stats.py` / `analyze.py`: dataset statistics, and their plots and report;
- `synthetic.py`: the synthetic ad world the embedded default trains on (and its optional noise).

Data curation (filters, dedup, consistency, pseudo-labels) is the `paddle_caption.curate` package.
"""
