"""The one-command demo (`make demo`): `pipeline.py` runs the user-facing commands on the synthetic
world, image model against the no-image ablation; `plots.py` draws the caption grid and curves."""
