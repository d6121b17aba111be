"""The teacher-assistant recommendation (Mirzadeh et al.: scratch accuracy closest to the T/S midpoint)."""

import json

import pytest

from distill.tools.choose_assistant import main, rank_assistants
from distill.errors import ConfigError


def test_rank_by_distance_to_midpoint():
    # paper, CIFAR-10 plain CNNs: teacher 10 ~ 0.80, student 2 ~ 0.70 → midpoint 0.75
    ranked = rank_assistants(0.80, 0.70, {"cnn8": 0.79, "cnn6": 0.77, "cnn4": 0.745})
    assert [row["model"] for row in ranked] == ["cnn4", "cnn6", "cnn8"]
    assert ranked[0]["distance"] == pytest.approx(0.005)
    with pytest.raises(ConfigError):
        rank_assistants(0.8, 0.7, {})


def _run(root, name, model, acc):
    run = root / name / "version_0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"method": "Supervised", "student": model, "best_val_acc": acc,
                                                  "test_acc": acc, "config": {}}))
    return str(run)


def test_command_averages_seeds_and_plots(tmp_path, capsys):
    teacher = _run(tmp_path, "t", "resnet110", 0.90)
    student = _run(tmp_path, "s", "resnet8", 0.80)
    candidates = [_run(tmp_path, "a0", "resnet56", 0.89), _run(tmp_path, "a1", "resnet20", 0.84),
                  _run(tmp_path, "a2", "resnet20", 0.86), _run(tmp_path, "a3", "resnet14", 0.83)]
    ranked = main(["--teacher", teacher, "--student", student, "--candidates", *candidates,
                   "--out", str(tmp_path / "ta.png")])
    assert ranked[0]["model"] == "resnet20" and ranked[0]["scratch_val_acc"] == pytest.approx(0.85)
    assert "recommended assistant: resnet20" in capsys.readouterr().out
    assert (tmp_path / "ta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
