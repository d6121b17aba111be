"""Device operations per training step: how many ATen operators a step dispatches.

At the recipes' batch sizes a GPU step is bound by launching kernels, not by their arithmetic (issue 20's H200
figures for resnet32x4 → resnet8x4 at batch 64), so every operator the training loop adds around the recipe's own
computation costs a launch and the host time around it, whatever its size. Counting operators is exact and
repeatable where timing on a shared 2-core CPU scatters by several per cent: a method's step, the bare
LightningModule doing only its bound's work (:class:`distill.tools.bench.LightningFloor`) and the bound in plain
torch each get a count, and the differences say what our bookkeeping and what Lightning's loop add per step.

What counts: every operator call that reaches the dispatcher below autograd (forward, backward and the
optimiser's), except views (``detach``, ``view``, ``t``, ...: metadata only) and allocations (``empty``,
``set_``, ...), which launch no kernel. A count is a proxy for launches, not their exact number: one foreach
operator launches a few kernels, and the few operators on host tensors (the step's losses once read) count too.

* Optimisers are counted as they run on a GPU: torch's optimisers take their multi-tensor (``foreach``)
  implementation by default on CUDA, a few operators per update, and elsewhere a loop with several operators per
  parameter; the count sets ``foreach`` where the optimiser leaves the choice to torch (:func:`foreach_as_on_cuda`).
* Under ``inference_mode`` (the teachers' forward passes) operators reach the count as the modules call them
  (``conv2d``, ``batch_norm``), and under autocast without the casts of their weights: count at ``32-true``.
* Compiled networks are not counted as compiled (torch.compile steps aside while a dispatch mode is active):
  counts describe eager steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode


#: Operators that only allocate or re-point storage, or mark a profiler range: no kernel. (Which level of an
#: operator the count sees depends on the autograd mode: under ``no_grad`` a batch norm reaches it as
#: ``native_batch_norm`` plus the ``empty`` tensors of its saved statistics, under ``inference_mode`` as one
#: ``batch_norm``.)
NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_",
                       "_record_function_enter", "_record_function_enter_new", "_record_function_exit"})


def launches_kernel(func: Any) -> bool:
    """Whether an ATen operator may launch a kernel: not a view, not an allocation (:data:`NO_KERNEL`)."""
    return not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators that may launch a kernel (:func:`launches_kernel`) dispatched while active, by
    name (``counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if launches_kernel(func):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def foreach_as_on_cuda(optimizer: Optimizer) -> None:
    """Makes ``optimizer`` step with its multi-tensor (``foreach``) implementation, as torch chooses on CUDA,
    where its groups leave the choice to torch (``foreach=None``) and do not ask for the fused kernel."""
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


class CountStepOperators(Callback):
    """Counts the operators of training steps ``start`` to ``start + steps - 1`` of a fit: from each step's
    ``on_train_batch_start`` to its ``on_train_batch_end`` (the step, the backward pass, the optimiser step and
    Lightning's loop around them; not the epoch's start and end). ``steps`` should be a multiple of the work done
    every few steps (the loss reads every 16 steps, the epoch means' fold every 64) for an exact per-step share."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.count = OperatorCount()
        #: the operators of each counted step, in order
        self.each: list[int] = []
        self._before: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            foreach_as_on_cuda(optimizer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.start <= trainer.global_step < self.start + self.steps:
            self._before = self.count.total
            self.count.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._before is not None:
            self.count.__exit__(None, None, None)
            self.each.append(self.count.total - self._before)
            self._before = None

    def per_step(self) -> float:
        if len(self.each) != self.steps:
            raise RuntimeError(f"counted {len(self.each)} training steps of the {self.steps} asked for: the fit ended "
                               f"before step {self.start + self.steps}")
        return self.count.total / self.steps


def count_per_step(step: Callable[[int], None], steps: int) -> tuple[float, OperatorCount]:
    """Operators per call of ``step(k)`` over ``k = 0 .. steps - 1`` (e.g. a plain-torch bound), and the count."""
    count = OperatorCount()
    with count:
        for k in range(steps):
            step(k)
    return count.total / steps, count


__all__ = ["CountStepOperators", "OperatorCount", "count_per_step", "foreach_as_on_cuda", "launches_kernel"]
