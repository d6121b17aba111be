"""Shared fixtures: tiny generated data, tiny teachers, and a working directory per test."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from distill.data import DistillDataModule
from distill.models import create_model
from distill.teachers import NetworkSpec, save_network

REPO = Path(__file__).resolve().parents[1]
FAKE = dict(dataset="fake", num_classes=10, in_channels=3, image_size=16, fake_sizes=[96, 48, 48], batch_size=32)


@pytest.fixture(autouse=True)
def _quiet_and_isolated(tmp_path, monkeypatch):
    """Every test runs in its own directory (runs/ lands there) with one thread per op: the machines are small.

    The environment is restored afterwards: Lightning writes cluster variables (MASTER_ADDR from a
    simulated SLURM job, MASTER_PORT, ...) into ``os.environ``, and a later DDP test would inherit them.
    """
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)


def fake_datamodule(**overrides) -> DistillDataModule:
    return DistillDataModule(**{**FAKE, **overrides})


def write_teacher(path: Path, model: str = "resnet8", num_classes: int = 10, in_channels: int = 3,
                  image_size: int = 16, seed: int = 0) -> Path:
    """A randomly initialised network saved as a teacher file, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    spec = NetworkSpec(model, num_classes, in_channels, image_size)
    network = spec.build()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return save_network(network, spec, path)


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    return write_teacher(tmp_path / "teacher.safetensors")


def tiny_trainer(root: Path, name: str = "run", **kwargs) -> L.Trainer:
    from distill.run import run_loggers

    options = dict(max_epochs=2, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, logger=run_loggers(root, name), num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


class StopAfter(L.Callback):
    """Stops a fit after ``epochs`` epochs, as an interruption would (for resume tests)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class SigtermAt(L.Callback):
    """Sends this process a SIGTERM as the training step ``step`` starts (a scheduler's pre-emption mid-epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


__all__ = ["REPO", "FAKE", "fake_datamodule", "write_teacher", "tiny_trainer", "create_model", "StopAfter", "SigtermAt"]


def training_batch(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None,
                   batch_idx: int = 0):
    """A method's training step input, for calling ``training_losses`` directly."""
    from distill.methods import TrainingBatch

    return TrainingBatch(images, labels, torch.arange(len(images)) if indices is None else indices, batch_idx)


def in_training_losses(model) -> list[bool]:
    """A one-element flag that is True while ``model.training_losses`` runs (a training step's own work)."""
    flag = [False]
    original = model.training_losses

    def wrapped(batch):
        flag[0] = True
        try:
            return original(batch)
        finally:
            flag[0] = False

    model.training_losses = wrapped
    return flag
