"""Decoding: turning a loaded model and prompts into caption tokens. One module, one job:

- `config.py`: `GenerationConfig`, every decoding option declared once (type, default, bounds, help;
  paddle-free); `derive.py` builds predict_batch.py's flags and the service's request fields from it;
- `logits.py`: logits processing (repetition penalty, log-softmax, temperature/top-k/top-p sampling);
- `batch.py`: `DecodeBatch`, the KV-cache rows decoded together (add, step, step_many + rollback, keep);
- `beam.py`: `BeamSearch`, one prompt's beam search advanced one step at a time;
- `scheduler.py`: `ContinuousBatch`, greedy, sampling and beam requests joining and leaving one
  batch at step boundaries, with speculative verification of drafted tokens;
- `generate.py`: `generate`, the one-call API on top of the scheduler;
- `datastore.py`: the training captions' suffix-array datastore retrieval drafting reads;
- `drafting.py`: `Draft`, the retrieval drafter and `load_drafter` (what `--speculative` builds);
- `head_drafting.py`: drafting from the model's hidden state with Medusa heads, and the hybrid;
- `draft_budget.py`: how many draft tokens a step feeds, from the step's measured cost;
- `output_head.py`: the output layer's transposed weight kept while decoding (fast few-row logits);
- `greedy_head.py`: `GreedyHead`, greedy tokens from hidden states without the full output layer
  (exact: certified on the few tokens a trained model emits, else the full product).

Importing `config`, `derive`, `datastore` and `drafting` loads no Paddle (command lines parse before the model loads).
"""
