"""Throughput benchmark of the distillation methods: ``python benchmarks/throughput.py --help``.

The same as ``distill bench``; the harness lives in :mod:`distill.tools.bench`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
