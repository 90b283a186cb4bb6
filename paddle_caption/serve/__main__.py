"""`python -m paddle_caption.serve MODEL_DIR`: the caption service (see cli.py)."""
import sys

from paddle_caption.runtime import run_cli
from paddle_caption.serve.cli import main

sys.exit(run_cli(main))
