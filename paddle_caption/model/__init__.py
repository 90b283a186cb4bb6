"""The Mgen-VL / Qwen-VL model, with PaddleMIX `qwen_vl` parameter names.

- `config.py`: the architecture (MgenVLConfig, VisualConfig);
- `visual.py`: ViT + resampler (`visual.*`); `qwen.py`: the QWen decoder (`transformer.llm.*`);
- `mgen_vl.py`: the two joined by one scatter, plus `lm_head`;
- `attention.py` / `head.py` / `numpy_bridge.py`: attention core, RoPE and output layer (numpy on CPU);
  decoding (generation, beam search, speculative decoding) lives in `paddle_caption.decoding`;
- `checkpoint.py`: safetensors weights on disk, and the one state-dict checker.

Importing these modules configures nothing; commands call `paddle_caption.runtime.configure` first.
"""
