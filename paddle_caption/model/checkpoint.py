"""The old name of `weights_io.py` (safetensors weight files), kept only while `mgen_vl.py` and
tests/test_data_parallel.py, which other engineers are editing, still import it; delete this file
once they import `weights_io`."""
from .weights_io import (assign_parameter, check_state, checkpoint_dtype, load_into_model,  # noqa: F401
                         load_safetensors, save_model_state)
