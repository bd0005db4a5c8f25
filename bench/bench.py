"""Step1X-Edit speed benchmark (see src/step1x_edit/bench.py and bench/RESULTS.md).

    python bench/bench.py --out results.md          # H100/H200: full size, random weights, all modes
    python bench/bench.py --tiny --out /tmp/t.md     # CPU smoke run with the dev dimensions
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from step1x_edit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
