"""Scoring: `metrics.py` (CIDEr-D, BLEU, ROUGE-L as coco-caption computes them), `fields.py` (field
accuracy on the synthetic world's grammar), `scorers.py` (extra scores by name for training
evaluation), `evaluate.py` (`tools/evaluate.py`: results file against references)."""
