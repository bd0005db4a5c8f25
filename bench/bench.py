"""Step1X-Edit speed benchmark (see src/step1x_edit/bench.py and bench/RESULTS.md).

    python bench/bench.py --out results.md          # H100/H200: full size, random weights (+ results.json)
    python bench/bench.py --tiny --out /tmp/t.md     # CPU dry run with the dev dimensions
    bash bench/gpu-check.sh --wheels .whl            # a GPU session's one command (wheels, time limit, summary)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from step1x_edit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
