"""Deployment: a model exported as Paddle Inference graphs, and the engine that runs them.

- `graphs.py`: the three traceable graphs (vision, prefill, decode) over the model's own layers;
- `export.py`: MODEL_DIR -> a self-contained deployment directory (`manifest.json`);
- `predictors.py`: one graph on Paddle Inference + oneDNN (float32 / bfloat16);
- `engine.py`: `InferenceEngine`, called like the eager model by the decoding package;
- `cpu_features.py`: which precisions this CPU runs; `cli.py`: `tools/export_model.py`.
"""
