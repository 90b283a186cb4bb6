"""The demos, on the top floor: they drive the user-facing commands of every other package, and
no package imports them.

- `stages.py`: the stages every demo is built from, each a command run in a fresh process as a user
  would run it (synthetic data, convert, concurrent training, merge, concurrent prediction, scores);
- `pipeline.py` (`make demo`): the whole workflow on the synthetic world, image model against the
  no-image ablation; its results table and bar checks;
- `compare_modes.py` (`make compare-modes`): full / partial / LoRA fine-tuning under one budget;
- `curate_demo.py` (`make curate-demo`): raw noisy rows against curated rows;
- `plots.py`: the caption grid and the curves;
- `cli.py`: the three command lines (their shared data and budget flags declared once).
"""
