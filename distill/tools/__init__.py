"""The commands: each module is one ``distill <subcommand>`` (or ``python -m distill.tools.<name>``).

``report``, ``repro``, ``sweep``, ``bench``, ``robustness``, ``choose_assistant``, ``residual_budget``,
``class_bias``, ``demo`` and the kill test ``killtest``. Tools use the library (``distill.methods``,
``distill.data``, ``distill.models``, ...) and the CLI; nothing in the library imports a tool.
"""
