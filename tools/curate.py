"""Data curation: python tools/curate.py RECIPE.json (see paddle_caption/curate/recipe.py)"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("curate"))
