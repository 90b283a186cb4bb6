"""The caption service (`paddle-caption-serve MODEL_DIR`, `python -m paddle_caption.serve MODEL_DIR`).

- `protocol.py`: request/response schemas (OpenAI chat completions with image parts, /v1/captions)
  and the JSON error type;
- `engine.py`: the one thread that owns the model: a queue, dynamic and continuous batching
  (`decoding.scheduler.ContinuousBatch`);
- `service.py`: requests turned into engine jobs, with the limits, health and the gallery;
- `app.py`: thin FastAPI routes; `telemetry.py`: Prometheus metrics; `cli.py`: the command line;
- `static/`: the web page (no build step).
Captions go through the same Predictor as `predict_batch.py` (equal greedy captions, tested).
"""
