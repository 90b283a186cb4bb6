"""One exported graph run by Paddle Inference on the CPU: numpy arrays in, numpy arrays out.

The settings are the ones verified on this machine (/work/shared/notes/paddle_stack.md, 2026-12-03):
PIR program `prefix.json` + `prefix.pdiparams`, IR optimisation on, oneDNN on; bfloat16 is oneDNN's
bfloat16 pass over the float32 program (`enable_mkldnn_bfloat16`). Nothing of the kit's model code
is needed here: the program files hold the whole computation. (int8 is not offered: what failed on
Paddle 3.3.1 is in docs/deployment.md.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import UserError

PRECISIONS = ("float32", "bfloat16")


def create_predictor(prefix: str | Path, precision: str = "float32", threads: int = 1):
    """A Paddle Inference predictor for `prefix`.json/.pdiparams in `precision`."""
    from paddle import inference

    prefix = Path(prefix)
    program, params = prefix.with_suffix(".json"), prefix.with_suffix(".pdiparams")
    for path in (program, params):
        if not path.is_file():
            raise UserError(f"exported graph file missing: {path}")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    config = inference.Config(str(program), str(params))
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(max(1, int(threads)))
    config.switch_ir_optim(True)
    # Paddle Inference 3.3.1's constant folding fails to load the vision graph ("Tensor holds no
    # memory" in a cast it inserts while folding the resampler's LayerNorm of its learned queries,
    # a parameter-only subgraph); without it that small [256 x width] step runs per call.
    config.delete_pass("constant_folding_pass")
    config.enable_mkldnn()
    if precision == "bfloat16":
        config.enable_mkldnn_bfloat16()
    config.disable_glog_info()
    return inference.create_predictor(config)


class GraphRunner:
    """`runner(*arrays)` -> list of output arrays, inputs and outputs in the graph's own order."""

    def __init__(self, prefix, precision: str = "float32", threads: int = 1):
        self.predictor = create_predictor(prefix, precision, threads)
        self.input_names = self.predictor.get_input_names()
        self.output_names = self.predictor.get_output_names()
        self.inputs = [self.predictor.get_input_handle(n) for n in self.input_names]
        self.outputs = [self.predictor.get_output_handle(n) for n in self.output_names]

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise ValueError(f"graph takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(arrays)}")
        for handle, array in zip(self.inputs, arrays):
            array = np.ascontiguousarray(array)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(array)
        self.predictor.run()
        return [handle.copy_to_cpu() for handle in self.outputs]
