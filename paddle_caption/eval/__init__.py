"""Scoring.

- `caption_scores.py`: CIDEr-D, BLEU, ROUGE-L as coco-caption computes them;
- `fields.py`: field accuracy on the synthetic world's grammar;
- `scorers.py`: extra scores by name for training evaluation;
- `evaluate.py`: a results file against references; `cli.py`: its command line (`tools/evaluate.py`).
"""
