"""paddle_caption: a PaddlePaddle-native kit for Qwen-VL ("Mgen-VL") ad-image captioning.

The three public names are imported lazily so that light tools (data conversion, metrics) start
without importing paddle.
"""
__version__ = "0.1.0"
__all__ = ["QWenVLTokenizer", "MgenVLConfig", "MgenVLForCausalLM"]


def __getattr__(name):
    if name == "QWenVLTokenizer":
        from .tokenizer import QWenVLTokenizer

        return QWenVLTokenizer
    if name == "MgenVLConfig":
        from .model.config import MgenVLConfig

        return MgenVLConfig
    if name == "MgenVLForCausalLM":
        from .model.mgen_vl import MgenVLForCausalLM

        return MgenVLForCausalLM
    raise AttributeError(f"module 'paddle_caption' has no attribute {name!r}")
