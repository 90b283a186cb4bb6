"""`python -m paddle_caption.serve MODEL_DIR`: the caption service (see cli.py)."""
import sys

from paddle_caption.entry_points import run

sys.exit(run("serve"))
