#!/usr/bin/env python
"""Caption a test TSV for submission: python predict_batch.py TEST.tsv RESULTS.txt MODEL_DIR [options].

See paddle_caption/predict/ (also for multi-GPU runs with paddle.distributed.launch).
"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("predict"))
