"""The Mgen-VL / Qwen-VL model, with PaddleMIX `qwen_vl` parameter names.

- `config.py`: the architecture (MgenVLConfig, VisualConfig);
- `visual.py`: ViT + resampler (`visual.*`); `qwen.py`: the QWen decoder (`transformer.llm.*`);
- `mgen_vl.py`: the two joined by one scatter, plus `lm_head`;
- `attention.py` / `head.py` / `numpy_bridge.py`: attention core, RoPE and output layer (numpy on CPU);
- `generation.py`: batched greedy / sampling / beam generation with a KV cache, and speculative
  greedy decoding (draft, verify, roll the cache back); `drafting.py`: the retrieval datastore and
  drafter it drafts with;
- `weights_io.py`: safetensors weight files on disk (read, write, shard), and the one state-dict
  checker (`checkpoint.py` is its old name, kept only until `mgen_vl.py` imports the new one);
- `import_weights.py`: PaddleMIX / Hugging Face Qwen-VL weights converted into a model directory
  (`hf_layout.py`: Hugging Face's names and orientations); `cli.py`: its command line
  (`convert-checkpoint`).

Importing these modules configures nothing; commands call `paddle_caption.runtime.configure` first.
"""
