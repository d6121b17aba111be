"""Importable by `distill fit` subprocesses of tests/test_reliability.py (tests/ goes on their PYTHONPATH)."""

from __future__ import annotations

import contextlib
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


#: Tensor methods that read a value on the host: on a GPU each waits for everything queued before it.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


#: distill.augment functions that read random numbers drawn on the host by a CPU generator (so that the draws are
#: the same on every device type): no device work to wait for.
HOST_DRAWS = ("sample_mixup",)


class NoHostReads(L.Callback):
    """Records every host read of a tensor (:data:`HOST_READS`) between the start of a training step and the start
    of the next, for the steps after an epoch's first and before its last (the first builds optimiser state; the
    last reads the losses, validates and checkpoints): the training step, backward, the optimiser, the loggers,
    the progress bar and every callback. Reads of tensors that live on the host by design do not count: a
    DataLoader's data (its batches reach the device afterwards), torch's own bookkeeping (an optimiser's step
    count, a CPU tensor unless it is capturable) and :data:`HOST_DRAWS`. ``calls`` holds ``(step, method,
    caller)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, str]] = []
        self.watched = 0
        self._saved: dict[str, object] | None = None

    def _watch(self, step: int) -> None:
        import traceback

        import torch

        self._saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def reading(tensor, *args, _name=name, _original=original, **kwargs):
                stack = traceback.extract_stack()[:-1]
                host_side = ("/torch/" in stack[-1].filename  # torch's own bookkeeping (an optimiser's step count)
                             or any("/torch/utils/data/" in f.filename for f in stack)  # a DataLoader's data
                             or (stack[-1].filename.endswith("distill/augment.py") and stack[-1].name in HOST_DRAWS))
                if not host_side:
                    self.calls.append((step, _name, f"{stack[-1].filename}:{stack[-1].lineno} ({stack[-1].name})"))
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, reading)
        self.watched += 1

    def _unwatch(self) -> None:
        import torch

        if self._saved is None:
            return
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        self._saved = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._unwatch()
        if 1 <= batch_idx < trainer.num_training_batches - 1:
            self._watch(trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._unwatch()

    def teardown(self, trainer, pl_module, stage):
        self._unwatch()


@contextlib.contextmanager
def host_reads():
    """The host reads (:class:`NoHostReads`' ``(step, method, caller)``, step 0) made inside the block."""
    watcher = NoHostReads()
    watcher._watch(0)
    try:
        yield watcher.calls
    finally:
        watcher._unwatch()
