"""distill.lightning_private: each use of Lightning's private API still does what the library relies on."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from conftest import fake_datamodule, tiny_trainer
from distill import lightning_private as private
from distill.methods import Supervised

DATA = dict(num_classes=10, in_channels=3, image_size=16)


def test_attached_trainer_is_none_alone_and_the_fitting_trainer_in_a_fit(tmp_path):
    seen = []

    class Recorder(Supervised):
        def training_step(self, batch, batch_idx):
            seen.append(private.attached_trainer(self))
            return super().training_step(batch, batch_idx)

    model = Recorder(student="mlp_30_30", **DATA)
    assert private.attached_trainer(model) is None
    with pytest.raises(RuntimeError):
        model.trainer  # the public property has no "not attached" answer
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=fake_datamodule())
    assert seen == [trainer]


@pytest.mark.parametrize("every", [1, 2])
def test_writes_step_logs_matches_the_steps_the_loggers_write(tmp_path, every):
    decisions = []

    class Recorder(Supervised):
        def training_step(self, batch, batch_idx):
            decisions.append(private.writes_step_logs(self.trainer))
            return super().training_step(batch, batch_idx)

    model = Recorder(student="mlp_30_30", **DATA)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, log_every_n_steps=every)
    trainer.fit(model, datamodule=fake_datamodule())
    assert decisions == [(step + 1) % every == 0 for step in range(6)]  # 3 batches an epoch, 2 epochs
    logged = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    step_rows = [line for line in logged[1:] if line.split(",")[logged[0].split(",").index("train/loss_step")]]
    assert len(step_rows) == sum(decisions)


def test_set_initial_hparams_reaches_the_loggers_not_init(tmp_path):
    model = Supervised(student="mlp_30_30", **DATA)
    private.set_initial_hparams(model, {"note": "x"})
    assert model.hparams_initial["note"] == "x" and "note" not in model.hparams
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        model, datamodule=fake_datamodule())
    assert "note: x" in (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()


def test_rewrap_ddp_uses_methods_the_ddp_strategy_has():
    # the two-process TeacherAssistantKD test (test_two_stage_path_under_ddp) exercises the rewrap itself
    assert callable(DDPStrategy._setup_model) and callable(DDPStrategy._register_ddp_hooks)


def test_cluster_environment_is_the_detected_one(monkeypatch):
    assert isinstance(private.cluster_environment(L.Trainer(accelerator="cpu", logger=False)), LightningEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert isinstance(private.cluster_environment(L.Trainer(accelerator="cpu", logger=False)), SLURMEnvironment)


def test_training_loaders_are_the_ones_the_fit_iterates(tmp_path):
    found = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            found.append(private.training_loaders(trainer))

    data = fake_datamodule()
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[Recorder()]).fit(
        Supervised(student="mlp_30_30", **DATA), datamodule=data)
    (loaders,) = found
    assert len(loaders) == 1 and isinstance(loaders[0], torch.utils.data.DataLoader)
    assert len(loaders[0].dataset) == 96  # the fake training split


def test_the_quiet_console_drops_lightnings_tips_and_override_notes_and_keeps_the_rest(tmp_path, capsys):
    """Lightning's own messages, through its own rank-zero logger: a Trainer's tips and a method's callback note go,
    its fit summary stays (the texts are Lightning's; an upgrade that rewords them fails here)."""
    import logging

    assert any(isinstance(f, private.QuietConsole) for f in logging.getLogger(private.RANK_ZERO_LOGGER).filters)
    handler_records = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_records.append(record.getMessage())

    logger = logging.getLogger(private.RANK_ZERO_LOGGER)
    keep = Keep()
    logger.addHandler(keep)
    try:
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                            default_root_dir=tmp_path, enable_progress_bar=False)
        trainer.fit(Supervised(student="mlp_30_30", **DATA), datamodule=fake_datamodule())
    finally:
        logger.removeHandler(keep)
    assert any("max_epochs=1` reached" in m for m in handler_records)  # Lightning's own lines still show
    assert not [m for m in handler_records if "💡 Tip:" in m or "will override existing callbacks" in m]
    logger.removeFilter(next(f for f in logger.filters if isinstance(f, private.QuietConsole)))
    try:  # the same fit without the filter does say both: the test sees what it claims to drop
        logger.addHandler(keep)
        L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                  default_root_dir=tmp_path, enable_progress_bar=False).fit(
            Supervised(student="mlp_30_30", **DATA), datamodule=fake_datamodule())
    finally:
        logger.removeHandler(keep)
        logger.addFilter(private.QuietConsole())
    assert any("will override existing callbacks" in m for m in handler_records)


def test_epoch_to_train_is_the_epoch_lightning_then_gives_the_samplers_and_the_iterator_can_be_remade(tmp_path,
                                                                                                   monkeypatch):
    """At on_train_start of a resumed fit, epoch_to_train is the epoch the fit loop sets next; re-making the
    training iterator there makes the epoch's batches come from a sampler placed before it."""
    from distill.data.splits import EpochShuffle

    class Recorder(EpochShuffle):
        epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            Recorder.epochs.append(epoch)
            super().set_epoch(epoch)

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["epoch"] = private.epoch_to_train(trainer)
            private.restart_training_iterator(trainer)

    monkeypatch.setattr("distill.data.module.EpochShuffle", Recorder)
    data = fake_datamodule()
    model = Supervised(student="mlp_30_30", **DATA)
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(model, datamodule=data)
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    Recorder.epochs.clear()
    model = Supervised(student="mlp_30_30", **DATA)
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt))
    assert seen["epoch"] == 2 and Recorder.epochs[0] == 2 and trainer.global_step == 9
