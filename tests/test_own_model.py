"""Your own network by its import path (``student: mypackage.models.MyNet``), trained and reloaded as a teacher."""

from __future__ import annotations

import pytest
import torch

from distill.errors import ConfigError
from distill.models import create_model

NETWORK = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


NOT_A_NETWORK = 3
'''


@pytest.fixture
def own_package(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(NETWORK)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets.TinyNet"


def test_an_import_path_builds_the_class_with_sizes_and_options(own_package):
    model = create_model(own_package, num_classes=7, in_channels=1, image_size=8, width=5)
    assert type(model).__name__ == "TinyNet" and model.model_name == own_package
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7) and model.body[0].out_channels == 5


def test_wrong_import_paths_are_one_line_errors(own_package):
    with pytest.raises(ConfigError, match="cannot import 'no_such_package'"):
        create_model("no_such_package.Net", num_classes=10)
    with pytest.raises(ConfigError, match="has no class or function 'Missing'"):
        create_model("my_nets.Missing", num_classes=10)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'depth'"):
        create_model(own_package, num_classes=10, depth=3)
    with pytest.raises(ConfigError, match="has no class or function 'NOT_A_NETWORK'"):
        create_model("my_nets.NOT_A_NETWORK", num_classes=10)


def test_cli_trains_your_network_and_its_export_teaches(own_package):
    from distill.cli import main
    from distill.teachers import load_network

    data = ["--data.dataset", "fake", "--data.image_size", "8", "--data.fake_sizes", "[64, 32, 32]",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    cli = main(["fit", "--model", "Supervised", "--model.student", own_package, "--model.student_kwargs", "{width: 4}",
                *data])
    exported = cli.results["model_file"]
    teacher = load_network(exported, None, num_classes=10, in_channels=3, image_size=8)
    assert type(teacher.network).__name__ == "TinyNet" and teacher.describe()["model"] == own_package
    kd = main(["fit", "--model", "BaselineKD", "--model.student", "resnet8", "--model.teacher", exported, *data])
    assert kd.results["teacher"]["model"] == own_package
