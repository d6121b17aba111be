"""The callback that makes a run resumable exactly and pre-emptible (installed by every DistillModule)."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distill.lightning_private import cluster_environment, epoch_to_train, restart_training_iterator, training_loaders
from distill.reliability import nonfinite
from distill.reliability.checkpoints import AtomicCheckpointIO

# RunGuard continues a run stopped mid-epoch at the right batch (see _continue_epoch), which is
# what Lightning's warning about non-resumable data loaders is about.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def preemption_signals(trainer: L.Trainer) -> tuple[int, ...]:
    """The signals a run answers by stopping for a resume: SIGTERM, and SIGUSR1 unless Lightning's SLURM
    auto-requeue owns it. None outside the main thread (Python handles signals only there)."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    environment = cluster_environment(trainer)
    lightning_requeues = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    return tuple(s for s in PREEMPTION_SIGNALS if not (s == signal.SIGUSR1 and lightning_requeues))


@contextlib.contextmanager
def preemptible_after_training(trainer: L.Trainer) -> Iterator[None]:
    """Pre-emption for the end of a run: the test of the best checkpoint, the export and results.json.

    RunGuard's handlers live as long as ``trainer.fit``; a signal after it would otherwise kill the run
    with nothing said. Here it stops the run as one during training does (``Preempted``, exit status
    0): ``last.ckpt`` already holds the finished training, so ``distill fit --resume`` only tests and
    exports. Single-process runs only: under DDP a signal may reach one process, which would leave the
    others waiting in the test's collectives, so there the default handlers stay.
    """
    signals = preemption_signals(trainer) if trainer.world_size == 1 else ()
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""

    def stop(signum: int, frame: Any) -> None:
        run_dir = Path(last).parent.parent if last else Path(trainer.log_dir or trainer.default_root_dir)
        raise Preempted(f"by {signal.Signals(signum).name} after training, before the test: "
                        f"{last or 'the last checkpoint'} holds the finished training", last, run_dir)

    previous = {signum: signal.signal(signum, stop) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class Stopped(BaseException):
    """SIGTERM while no run is training (it is being set up, or has finished): the command stops and cleans up.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def signals_stop_the_command() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` for as long as the command runs, so its clean-up (giving back the run
    directory it claimed) happens instead of the process vanishing. RunGuard's pre-emption replaces this handler
    while a run trains, and Lightning's, which calls this one, while its Trainer runs. SIGUSR1 is left alone:
    Lightning's SLURM requeue takes it only when no other handler is installed. A handler the caller installed
    (or an ignored signal) is kept."""
    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    installs = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, stop) if installs else None
    try:
        yield
    finally:
        if installs and signal.getsignal(signal.SIGTERM) is stop:
            signal.signal(signal.SIGTERM, previous)


class Preempted(SystemExit):
    """A run stopped by SIGTERM/SIGUSR1 after saving ``last.ckpt``: exit status 0, resume to finish."""

    def __init__(self, what: str, checkpoint: str, run_dir: Path) -> None:
        super().__init__(0)
        self.message = f"pre-empted {what}; continue with: distill fit --resume {run_dir}"
        self.checkpoint = checkpoint


def _rng_state() -> dict[str, Any]:
    """Every generator that augmentation and dropout draw from, in a weights-only-loadable form."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunGuard(Callback):
    """Atomic checkpoints, exact resume and pre-emption for every run (``DistillModule.configure_callbacks``).

    * **Atomic checkpoints**: replaces the strategy's default ``TorchCheckpointIO`` with
      :class:`AtomicCheckpointIO` (a CheckpointIO the user configured is kept).
    * **Exact resume**: each checkpoint stores the torch/NumPy/Python (and CUDA) generator states; a
      resumed run restores them just before its first training batch, so augmentation and dropout
      continue as in an uninterrupted run. A checkpoint written mid-epoch (pre-emption, or
      ``every_n_train_steps``) continues that epoch at the next batch: the data sampler skips the
      batches already trained on (Lightning alone would restart the epoch's order from its start).
    * **Pre-emption**: SIGTERM and SIGUSR1 (what SLURM sends before a job's end) set a flag; at the
      next batch end the run saves ``last.ckpt`` (atomically) and stops with :class:`Preempted`
      (exit status 0), to be resumed with ``distill fit --resume <run_dir>``. A signal on the last
      batch of an epoch lets the epoch finish, since its validation and ``last.ckpt`` follow at once.
      Under SLURM with Lightning's ``auto_requeue`` (its default), SIGUSR1 stays Lightning's (it saves
      an HPC checkpoint and requeues the job), so nothing is handled twice.
    """

    def __init__(self) -> None:
        self._requested: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------------------- atomic checkpoints
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # ------------------------------------------------------------------------- exact resume
    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(), "mid_epoch": self._mid_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None:
            # before the restore: re-making an iterator draws from the global generator
            self._place_samplers(trainer)
            _set_rng_state(self._restored["rng"])
            if not self._restored["mid_epoch"]:
                # An uninterrupted run creates the next epoch's DataLoader iterator after this
                # checkpoint, which draws one seed from the global generator; the resumed run made that
                # draw before the restore, so make it again.
                torch.empty((), dtype=torch.int64).random_()
            self._restored = None
        self._install_signal_handlers(trainer)

    def _place_samplers(self, trainer: L.Trainer) -> None:
        """The resumed epoch's order, from the batch where it stopped. DataLoader workers take their first indices
        when the iterator is made, which Lightning does before it sets the samplers' epoch: with workers, the
        iterator is made again once the samplers are placed (without them, the samplers are read lazily)."""
        loaders = training_loaders(trainer)
        for loader in loaders:
            for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch_to_train(trainer))
        self._continue_epoch(trainer)
        if any(getattr(loader, "num_workers", 0) for loader in loaders):
            restart_training_iterator(trainer)

    @property
    def _mid_epoch(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return False
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return 0 < done < trainer.num_training_batches

    def _continue_epoch(self, trainer: L.Trainer) -> None:
        if not self._mid_epoch:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for loader in training_loaders(trainer):
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "skip_next"):
                sampler.skip_next(done * loader.batch_size)
            else:
                warnings.warn(f"resuming mid-epoch with a sampler that cannot skip ({type(sampler).__name__}): "
                              "the rest of this epoch sees other batches than an uninterrupted run.")

    # ------------------------------------------------------------------------- pre-emption
    def _install_signal_handlers(self, trainer: L.Trainer) -> None:
        for signum in preemption_signals(trainer):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._requested = signum

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_signal_handlers()

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        requested = self._requested is not None
        if trainer.world_size > 1:  # a signal may reach one process only: all stop together
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        return requested

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # on the epoch's last batch: its validation and last.ckpt come next
        if trainer.world_size > 1 and (batch_idx + 1) % nonfinite.READ_EVERY:
            return  # agreeing on a stop reads a device value on the host (waits for the GPU): every few steps
        if not self._stop_requested(trainer):
            return
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = str(Path(directory) / "last.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: a resume continues from it
        self._stop(trainer, path)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if last and self._stop_requested(trainer):  # the previous epoch ended with its last.ckpt
            self._stop(trainer, last)

    def _stop(self, trainer: L.Trainer, path: str) -> None:
        name = signal.Signals(self._requested).name if self._requested else "a signal on another process"
        raise Preempted(f"by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {path}",
                        path, Path(path).parent.parent)
