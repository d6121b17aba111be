"""Throughput benchmark of the distillation methods: ``python benchmarks/throughput.py --help``.

The same as ``distill bench``; the harness lives in :mod:`distill.tools.bench`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.cli import user_errors_as_exit  # noqa: E402
from distill.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    with user_errors_as_exit():  # a user error is one line and exit status 2, as with `distill bench`
        main()
