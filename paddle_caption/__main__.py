"""`python -m paddle_caption COMMAND [args]`: every command of the kit (see entry_points.py)."""
import sys

from .entry_points import dispatch

sys.exit(dispatch())
