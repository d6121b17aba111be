"""Importable by `distill fit` subprocesses of tests/test_reliability.py (tests/ goes on their PYTHONPATH)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class StepLosses(L.Callback):
    """Writes this process's training loss of every step to ``<out>/losses-rank<r>.json``."""

    def __init__(self, out: str, steps: int = 4) -> None:
        self.out, self.steps, self.losses = Path(out), steps, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.losses) < self.steps:
            self.losses.append(float(outputs["loss"]))
        if len(self.losses) == self.steps and not os.environ.get("_STEP_LOSSES_DONE"):
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f"losses-rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))
