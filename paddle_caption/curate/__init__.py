"""Data curation (`tools/curate.py RECIPE`): clean -> synthesize -> clean, as a recipe of operations.

A recipe (`recipe.py`, JSON) lists operations in order, data-juicer style. Each operation first
computes its statistic into every sample (`compute_stats`), then decides apart from it (`process`),
so the report, the ledger and the filter read the same numbers.

- `samples.py`: the sample (a records.jsonl record plus stats) and its streamed files;
- `thresholds.py`: bounds fixed or computed on the data (percentile, mean +- k*std, the mean); the
  statistics themselves are `paddle_caption.data.distribution`'s;
- `ops/`: the operations, the kit's one filter system (`base.py` the classes and the registry;
  `cleaning.py` the converter's cleaning rules, which `tools/convert_labels.py` runs as its default
  recipe; `filters.py` image and caption sizes; `dedup.py` exact and near duplicates;
  `consistency.py` the captioner's image-text consistency; `cluster.py` k-means selection;
  `repeat.py` resampling; `pseudo_label.py` re-captioning and pseudo-labels);
- `scoring.py`: the model side: batches of samples through the Predictor's model (log-probabilities,
  pooled vision features, candidate captions); the work of several processes is shared through
  `paddle_caption.shards` (`runner.compute_shard`);
- `runner.py`: stages, ledger, resume, outputs; `report.py`: report.md and the PNG plots;
- `formats.py`: data-juicer jsonl export/import; `cli.py`: the command line.

`make curate-demo` (raw noisy rows against curated rows) sits with the other demos:
`paddle_caption/demo/curate_demo.py`.
"""
