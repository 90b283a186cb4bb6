"""Training: `supervised_finetune.py` and `merge_local_params.py`.

- `config.py`: TrainConfig, one JSON file per run; `cli.py`: the command lines of `train`, `merge`
  and `plan-memory`;
- `model_init.py`: the starting model and which parameters train (`freeze.py`: name globs; `lora.py`:
  PaddleNLP LoRA adapters);
- `trainer.py`: the loop; `mixed_precision.py`: bfloat16/float16 as Paddle's O2 (master weights,
  autocast, float16 loss scaling); `parallel.py`: data parallel, optimizer-state sharding and the
  decisions all ranks share; `schedule.py`: the learning rate; `run_checkpoints.py`: a run's checkpoint files and the
  optimiser state; `evaluation.py`: validation loss and captions through the Predictor;
- `objectives.py`: what a step minimises (cross-entropy, `scst.py`, the draft heads of
  `draft_heads.py`); `augment.py` in data/ for caption-aware augmentation;
- `merge.py`: trained parameters or adapters merged into a full model directory, in the base's dtype;
- `memory_plan.py`: GPU memory of a config before anything is allocated (`memory_report.py` prints it;
  `scst_memory.py`, `heads_memory.py`: what SCST and the draft_heads mode add).
"""
