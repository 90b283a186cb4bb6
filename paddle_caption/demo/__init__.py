"""The one-command demo (`make demo`): `pipeline.py` runs the user-facing commands on the synthetic
world, image model against the no-image ablation; `compare_modes.py` (`make compare-modes`) reuses
its stages for full / partial / LoRA fine-tuning under one budget; `plots.py` draws the caption grid
and curves."""
