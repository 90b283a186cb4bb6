"""The Mgen-VL / Qwen-VL model, with PaddleMIX `qwen_vl` parameter names.

- `config.py`: the architecture (MgenVLConfig, VisualConfig);
- `visual.py`: ViT + resampler (`visual.*`); `qwen.py`: the QWen decoder (`transformer.llm.*`);
- `mgen_vl.py`: the two joined by one scatter, plus `lm_head`;
- `attention.py` / `head.py` / `numpy_bridge.py`: attention core, RoPE and output layer (numpy on CPU);
  decoding (generation, beam search, speculative decoding) lives in `paddle_caption.decoding`;
- `weights_io.py`: safetensors weight files on disk (read, write, shard), and the one state-dict
  checker;
- `pickle_reader.py`: PyTorch `.bin` and Paddle `.pdparams` pickles read as arrays only;
- `import_weights.py`: PaddleMIX / Hugging Face Qwen-VL weights converted into a model directory
  (`hf_layout.py`: Hugging Face's names and orientations); `cli.py`: its command line
  (`convert-checkpoint`).

Importing these modules configures nothing; commands call `paddle_caption.runtime.configure` first.
"""
