"""`python -m paddle_caption gpu-check` (`make gpu-check`): a one-minute self-check of the GPU paths on
a GPU machine — the tiny architecture in bfloat16 with the shipped recipes' settings (O2, recompute,
flash attention), trained on every visible GPU and decoding equal-length and left-padded batches,
each compared with a float32 reference; PASS/FAIL per item with the Paddle and CUDA versions.

- `checks.py`: the items, each a function returning `Item`s, parameterised by device and dtype (so
  a CPU runs them in float32 against float32: how the suite tests everything but the GPU itself);
- `cli.py`: refuses without a GPU, runs the items in order, prints the report;
- `launched_train.py`: the script `paddle.distributed.launch` runs on every GPU.
"""
