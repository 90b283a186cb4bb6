"""The one-command demo (`make demo`): `pipeline.py` runs the user-facing commands on the synthetic
world, image model against the no-image ablation; `compare_modes.py` (`make compare-modes`) reuses
its stages for full / partial / LoRA fine-tuning under one budget; `curate_demo.py` (`make
curate-demo`) reuses them for raw noisy rows against curated rows; `plots.py` draws the caption grid
and curves. The demos sit on the top floor: they drive the commands of every other package and no
package imports them."""
