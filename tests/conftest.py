import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main  # noqa: E402,F401  (sets tinygrad's runtime options before any test imports tinygrad)
