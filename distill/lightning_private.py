"""Every use of Lightning's private API in the library, in one place, each with a test
(``tests/test_lightning_private.py``), so that a Lightning upgrade that moves one breaks a named test
here instead of a run.

Each function says what it needs the private attribute for and what public API is missing.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.strategies import DDPStrategy


class QuietConsole(logging.Filter):
    """Drops Lightning's console lines that tell a distill user nothing: advertising tips, and the note that a
    method's own callbacks (its ModelCheckpoint, ...) replace the Trainer's defaults, which they are meant to.
    Matches Lightning's message texts, which no public API names; installed on Lightning's rank-zero logger when the
    library is imported (by the CLI, the tools and notebooks alike)."""

    NOISE = ("💡 Tip:", "callbacks returned in `LightningModule.configure_callbacks` will override")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
if not any(isinstance(f, QuietConsole) for f in logging.getLogger(RANK_ZERO_LOGGER).filters):
    logging.getLogger(RANK_ZERO_LOGGER).addFilter(QuietConsole())
# torch >= 2.10 deprecates a pytree class that Lightning 2.6 still checks for, once per run
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer the module is attached to, or None: the public ``module.trainer`` raises when there is none
    (a method used from Python, its losses called in a test)."""
    return module._trainer


def writes_step_logs(trainer: L.Trainer) -> bool:
    """Whether the loggers write step values after the current training step (``log_every_n_steps``),
    Lightning's own test, which it exposes on no public object."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def set_initial_hparams(module: L.LightningModule | L.LightningDataModule, values: dict[str, Any]) -> None:
    """Adds ``values`` to what the loggers record as the hyperparameters (``hparams_initial``, read-only in
    the public API) without putting them into ``hparams``, which go back into ``__init__`` on load."""
    module._hparams_initial.update(values)


def rewrap_ddp(strategy: DDPStrategy) -> None:
    """Wraps the strategy's LightningModule in a new ``DistributedDataParallel``: DDP fixes the parameters it
    synchronises when it wraps, and a staged method changes them between stages."""
    strategy.model = strategy._setup_model(strategy.lightning_module)
    strategy._register_ddp_hooks()


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment:
    """The cluster environment the Trainer detected (SLURM, torchrun, ...); public on the strategy only once
    it is set up, and needed before that."""
    return trainer._accelerator_connector.cluster_environment


def training_loaders(trainer: L.Trainer) -> list[Any]:
    """The training dataloaders of the running fit, as the fit loop iterates them."""
    return list(trainer.fit_loop._combined_loader.flattened)


def epoch_to_train(trainer: L.Trainer) -> int:
    """The epoch the fit loop is about to train (after a resume: the one it continues or the next one), which it
    passes to the samplers' ``set_epoch`` only after it has made the training iterator."""
    return trainer.fit_loop.epoch_progress.current.processed


def restart_training_iterator(trainer: L.Trainer) -> None:
    """Makes the fit loop's training iterator anew. Lightning makes it before it sets the samplers' epoch, and
    DataLoader workers take their first indices at once; a resumed run re-makes it once its samplers are placed."""
    iter(trainer.fit_loop._data_fetcher)


def seed_worker_as_lightning(worker_id: int, rank: int) -> None:
    """Seeds a DataLoader worker as Lightning does for a loader without a ``worker_init_fn`` of its own, when
    ``seed_everything(workers=True)`` (the CLI's) set ``PL_SEED_WORKERS``: a loader whose workers need an init
    function for something else keeps Lightning's seeding this way. The condition is Lightning's private
    ``lightning.fabric.utilities.data._auto_add_worker_init_fn``."""
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


__all__ = ["epoch_to_train", "restart_training_iterator", "seed_worker_as_lightning", "attached_trainer", "writes_step_logs", "set_initial_hparams", "rewrap_ddp",
           "cluster_environment", "training_loaders"]
