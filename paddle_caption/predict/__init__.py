"""Batch prediction for leaderboard submission (`predict_batch.py`).

- `predictor.py`: the Predictor, the one captioning path: image preprocessing, the images-to-tensor
  step (`pixels`) and `decoding.generate` (also used by training evaluation, the demo, curation and
  the caption service, whose engine takes a Predictor);
- `inputs.py`: scanning TEST.tsv and reading each batch's images;
- partial results, resume and the shards of several processes: `paddle_caption/shards.py` (shared
  with curation);
- `run.py`: the run that ties them together; `cli.py`: the command line.
"""
