"""The ``distill`` console script: LightningCLI's subcommands (``fit``, ``validate``, ``test``, ``predict``,
:mod:`distill.cli`) and the tools (``distill report ...``), each ``distill.tools.<module>.main(argv)``."""

from __future__ import annotations

import importlib
import sys

from distill.cli import main, user_errors_as_exit

#: Subcommands that are not LightningCLI's: ``distill <name> ...`` calls ``<module>.main(argv)``.
TOOLS = {"report": "distill.tools.report", "sweep": "distill.tools.sweep", "choose-assistant": "distill.tools.choose_assistant",
         "repro": "distill.tools.repro", "claims-index": "distill.tools.claims_index",
         "bench": "distill.tools.bench", "bench-gpu": "distill.tools.gpu_suite",
         "residual-budget": "distill.tools.residual_budget",
         "robustness": "distill.tools.robustness"}


def entry_point() -> None:
    """The console script: exit status 0, or 2 for a user error (see :func:`distill.cli.main`)."""
    argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        tool = importlib.import_module(TOOLS[argv[0]])
        with user_errors_as_exit():
            tool.main(argv[1:])
        return
    main()


if __name__ == "__main__":
    entry_point()
