#!/usr/bin/env python
"""Caption a test TSV for submission: python predict_batch.py TEST.tsv RESULTS.txt MODEL_DIR [options].

See paddle_caption/serve/predict.py (also for multi-GPU runs with paddle.distributed.launch).
"""
import sys

from paddle_caption.runtime import run_cli
from paddle_caption.serve.predict import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
