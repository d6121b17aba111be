"""Runs that survive: atomic checkpoints, exact resume, pre-emption, non-finite losses.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same directory,
  flushes and fsyncs it and renames it over the old one, so a kill never leaves a truncated
  ``last.ckpt``; it loads checkpoints with ``weights_only=True`` (no pickled code runs).
* :class:`RunGuard`, a callback every :class:`~distill.methods.DistillModule` installs, puts that
  CheckpointIO in place, stores the random-number generators in each checkpoint so a resumed run
  draws the same augmentation and dropout as an uninterrupted one, continues a run stopped mid-epoch
  at the batch where it stopped, and turns SIGTERM/SIGUSR1 into "save ``last.ckpt`` and stop"
  (:class:`Preempted`).
* ``python -m distill.tools.killtest`` kills real ``distill fit`` runs and checks that the
  resumed results equal an uninterrupted run's.
"""

from distill.reliability.checkpoints import AtomicCheckpointIO, CHECKPOINT_WRITE_DELAY_ENV
from distill.reliability.guard import (Preempted, RunGuard, Stopped, preemptible_after_training,
                                      signals_stop_the_command)

__all__ = ["AtomicCheckpointIO", "CHECKPOINT_WRITE_DELAY_ENV", "Preempted", "RunGuard", "Stopped",
           "preemptible_after_training", "signals_stop_the_command"]
