"""Your own DataModule by ``class_path``: trained on, taught from, and one clear error when it lacks what a method needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.errors import ConfigError

DATAMODULE = '''
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Stripes(L.LightningDataModule):
    """Horizontal (class 0) or vertical (class 1) stripes with noise: learnable in a few steps."""

    num_classes, in_channels, image_size = 2, 1, 8

    def __init__(self, size: int = 96, batch_size: int = 16, with_indices: bool = False):
        super().__init__()
        self.save_hyperparameters()

    def _split(self, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (self.hparams.size,), generator=generator)
        stripes = (torch.arange(8) % 2).float().view(1, 8).expand(8, 8)
        images = torch.where(labels.view(-1, 1, 1) == 0, stripes.t(), stripes).unsqueeze(1)
        images = 2 * images - 1 + 0.2 * torch.randn(images.shape, generator=generator)
        parts = (images, labels, torch.arange(len(labels))) if self.hparams.with_indices else (images, labels)
        return TensorDataset(*parts)

    def train_dataloader(self):
        return DataLoader(self._split(0), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self._split(1), batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return DataLoader(self._split(2), batch_size=self.hparams.batch_size)


class Sizeless(Stripes):
    num_classes = None


class Testless(Stripes):
    test_dataloader = L.LightningDataModule.test_dataloader  # as a DataModule that never wrote one
'''

QUIET = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def own_datamodule(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(DATAMODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "my_data.Stripes"


def test_a_config_names_your_datamodule_and_a_student_and_teacher_train_on_it(own_datamodule, tmp_path):
    from distill.cli import main

    config = tmp_path / "stripes.yaml"
    config.write_text(f"data:\n  class_path: {own_datamodule}\n  init_args: {{size: 128, batch_size: 32}}\n"
                      "model:\n  class_path: distill.methods.Supervised\n  init_args: {student: mlp_30_30}\n")
    teacher = main(["fit", "--config", str(config), *QUIET]).results
    assert Path(teacher["run_dir"]).parent == Path("runs/stripes/supervised-mlp_30_30")  # named after the class
    assert teacher["config"]["data"] == {"class_path": own_datamodule,
                                         "init_args": {"size": 128, "batch_size": 32, "with_indices": False}}
    assert teacher["config"]["model"]["init_args"]["num_classes"] == 2  # linked from the DataModule
    assert teacher["test_acc"] > 0.9
    student = main(["fit", "--model", "BaselineKD", "--model.student", "mlp_30_30", "--model.teacher",
                    teacher["model_file"], "--data.class_path", own_datamodule, "--data.with_indices", "true",
                    *QUIET]).results
    assert student["config"]["data"]["init_args"]["batch_size"] == 16  # your default, not DistillDataModule's
    assert student["test_acc"] > 0.9 and student["test"]["test/agreement"] > 0.9
    assert student["teacher"]["num_classes"] == 2


def test_a_datamodule_without_the_facts_a_method_needs_is_one_error_before_any_run_directory(own_datamodule,
                                                                                             capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.class_path", "my_data.Sizeless",
              *QUIET])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("distill: error: Sizeless has no num_classes: ")
    assert "needs the attributes num_classes, in_channels, image_size" in error
    assert not Path("runs").exists()


def test_a_datamodule_without_a_test_loader_is_one_error_before_training(own_datamodule, capsys):
    """distill fit tests the best checkpoint when training ends; without a test_dataloader that used to fail there,
    after the whole training, with no results.json."""
    from distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.class_path", "my_data.Testless",
              *QUIET])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("distill: error: Testless has no test_dataloader, ")
    assert not Path("runs").exists()


def test_batches_of_other_shapes_are_one_error():
    from distill.methods.base import split_batch

    images, labels = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    assert split_batch((images, labels))[2] is None
    assert split_batch([images, labels, torch.arange(2)])[2].tolist() == [0, 1]
    with pytest.raises(ConfigError, match="a training or evaluation batch has 1 parts"):
        split_batch((images,))
