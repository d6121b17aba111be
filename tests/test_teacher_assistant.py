"""TeacherAssistantKD: stages, frozen predecessors, exports, resume mid-stage, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, StopAfter, fake_datamodule, in_training_losses, tiny_trainer, write_teacher
from distill.errors import ConfigError
from distill.methods import TeacherAssistantKD
from distill.run import finish_fit
from distill.teachers import load_network

DATA = dict(num_classes=10, in_channels=1, image_size=8)
FAKE = dict(in_channels=1, image_size=8, fake_sizes=[128, 48, 48])


@pytest.fixture
def mlp_teacher(tmp_path) -> Path:
    return write_teacher(tmp_path / "teacher.safetensors", model="mlp_800_800", in_channels=1, image_size=8)


def path_module(teacher, stage_epochs=(2, 3), **kwargs) -> TeacherAssistantKD:
    options = dict(student="mlp_30_30", assistants=["mlp_300_300"], stage_epochs=list(stage_epochs),
                   teacher=str(teacher), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    return TeacherAssistantKD(**{**options, **DATA, **kwargs})


def test_each_stage_frozen_predecessor_and_exports(tmp_path, mlp_teacher):
    L.seed_everything(0)
    model = path_module(mlp_teacher, stage_epochs=(2, 2))
    seen = []  # (stage, TA weights, TA requires_grad, TA training mode, optimised parameter ids)
    original = model.training_losses

    def spy(batch):
        optimised = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
        ta = model.assistants[0]
        seen.append((model.stage, ta.state_dict()["fc_layers.0.weight"].clone() if "fc_layers.0.weight" in ta.state_dict()
                     else next(iter(ta.state_dict().values())).clone(), any(p.requires_grad for p in ta.parameters()),
                     ta.training, optimised))
        return original(batch)

    model.training_losses = spy
    trainer = tiny_trainer(tmp_path, max_epochs=4)
    dm = fake_datamodule(**FAKE)
    trainer.fit(model, datamodule=dm)
    results = finish_fit(trainer, model, dm)

    stage2 = [s for s in seen if s[0] == 1]
    assert stage2 and [s for s in seen if s[0] == 0]
    ta_ids = {id(p) for p in model.assistants[0].parameters()}
    student_ids = {id(p) for p in model.student.parameters()}
    for _, weight, requires_grad, training, optimised in stage2:
        assert torch.equal(weight, stage2[0][1]) and not requires_grad and not training
        assert optimised == student_ids and not optimised & ta_ids
    assert all(p.grad is None for p in model.assistants[0].parameters())
    assert all(p.grad is None for p in model.teacher.parameters())

    # every stage recorded, tested and exported; the export is the stage's best weights and a valid teacher
    assert [s["stage"] for s in results["stages"]] == ["ta1", "student"]
    for stage in results["stages"]:
        assert 0 <= stage["best_val_acc"] <= 1 and 0 <= stage["test_acc"] <= 1
        loaded = load_network(stage["model_file"], None, num_classes=10, in_channels=1, image_size=8)
        assert loaded.spec.model == stage["model"]
    exported = load_network(results["stages"][0]["model_file"], None, 10, 1, 8).network
    for key, value in exported.state_dict().items():
        assert torch.equal(value, model.assistants[0].state_dict()[key])
    assert results["test_acc"] == results["stages"][-1]["test_acc"]
    assert results["best_val_acc"] == results["stages"][-1]["best_val_acc"]
    on_disk = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert len(on_disk["stages"]) == 2


def _run(tmp_path, teacher, name, ckpt_path=None, stop_after=None):
    L.seed_everything(3)
    model = path_module(teacher)
    callbacks = [StopAfter(stop_after)] if stop_after else []
    trainer = tiny_trainer(tmp_path, name=name, max_epochs=5, callbacks=callbacks)
    dm = fake_datamodule(**FAKE)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dm


def test_resume_in_the_middle_of_stage_two_matches_uninterrupted_run(tmp_path, mlp_teacher):
    trainer, model, dm = _run(tmp_path, mlp_teacher, "full")
    full = finish_fit(trainer, model, dm)

    _run(tmp_path, mlp_teacher, "cut", stop_after=3)  # stage 1 = epochs 0-1, stopped after epoch 2 of stage 2
    last = tmp_path / "cut" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["teacher_assistant"]["stage"] == 1
    trainer, resumed_model, dm = _run(tmp_path, mlp_teacher, "cut", ckpt_path=str(last))
    resumed = finish_fit(trainer, resumed_model, dm)

    for a, b in zip(full["stages"], resumed["stages"]):
        assert a["best_val_acc"] == b["best_val_acc"] and a["test_acc"] == b["test_acc"], (a, b)
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, resumed_model.student.state_dict()[key]), key


def test_supplied_assistant_skips_its_stage(tmp_path, mlp_teacher):
    ta = write_teacher(tmp_path / "ta.safetensors", model="mlp_300_300", in_channels=1, image_size=8, seed=5)
    model = path_module(mlp_teacher, stage_epochs=(0, 2), assistant_checkpoints=[str(ta)])
    assert model.stage == 1
    before = {k: v.clone() for k, v in model.assistants[0].state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    dm = fake_datamodule(**FAKE)
    trainer.fit(model, datamodule=dm)
    results = finish_fit(trainer, model, dm)
    supplied = load_network(ta, None, 10, 1, 8).network.state_dict()
    for key, value in model.assistants[0].state_dict().items():
        assert torch.equal(value, before[key]) and torch.equal(value, supplied[key])
    assert results["stages"][0]["supplied"] == str(ta) and "best_val_acc" not in results["stages"][0]


@pytest.mark.parametrize("kwargs, message", [
    ({"stage_epochs": [2]}, "stage_epochs needs 2 entries"),
    ({"stage_epochs": [0, 2]}, "needs at least 1 epoch"),
    ({"stage_alpha": [0.5, 2.0]}, "alpha"),
    ({"assistant_checkpoints": ["x.safetensors"], "stage_epochs": [2, 2]}, "set stage_epochs\\[0\\] to 0"),
])
def test_bad_paths(mlp_teacher, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        path_module(mlp_teacher, **kwargs)


def test_max_epochs_shorter_than_the_path(tmp_path, mlp_teacher):
    with pytest.raises(ConfigError, match="max_epochs"):
        tiny_trainer(tmp_path, max_epochs=3).fit(path_module(mlp_teacher), datamodule=fake_datamodule(**FAKE))


def test_cli_derives_max_epochs_from_the_stages_and_rejects_a_shorter_one_before_writing(tmp_path, mlp_teacher, capsys):
    from distill.cli import main

    args = ["fit", "--model", "TeacherAssistantKD", "--model.student", "mlp_30_30", "--model.assistants", "[mlp_300_300]",
            "--model.stage_epochs", "[2, 1]", "--model.teacher", str(mlp_teacher), "--data.dataset", "fake",
            "--data.image_size", "8", "--data.in_channels", "1", "--data.fake_sizes", "[64, 32, 32]",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.max_epochs", "2"])
    assert stop.value.code == 2 and "--model.init_args.stage_epochs [1, 1]" in capsys.readouterr().err
    assert not Path("runs").exists()  # nothing written
    cli = main([*args, "--trainer.max_epochs", "50"])  # longer than the stages: they decide
    assert cli.trainer.max_epochs == 3 and cli.trainer.current_epoch == 3
    assert [stage["epochs"] for stage in cli.results["stages"]] == [2, 1]


def test_two_stage_path_under_ddp(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    command = [str(Path(sys.executable).with_name("distill")), "fit", "--config", str(REPO / "configs/mnist5k/takd.yaml"),
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--model.init_args.teacher", str(teacher), "--model.init_args.stage_epochs=[1,1]",
               "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_RUN_DIR", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(Path("runs/mnist5k/takd/version_0/results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["ta1", "student"]
    assert all(0 < s["test_acc"] <= 1 for s in results["stages"])


def test_report_follows_the_whole_path(tmp_path, mlp_teacher):
    from distill.tools.report import load_runs, read_metric, summary_table

    model = path_module(mlp_teacher, stage_epochs=(2, 1))
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    dm = fake_datamodule(**FAKE)
    trainer.fit(model, datamodule=dm)
    finish_fit(trainer, model, dm)
    run = load_runs(tmp_path / "run")[0]
    assert [epoch for epoch, _ in read_metric(run, "val/acc")] == [1, 2, 3]  # ta1 for 2 epochs, then student
    assert "TeacherAssistantKD" in summary_table([run])


def test_cached_stage_teachers_train_the_same_path_without_running_a_teacher(tmp_path, mlp_teacher):
    """cache_teacher_outputs on device-resident data with the cifar augmentation (8 px: 18 views): each stage's
    teacher (the teacher, then the trained TA) has every view of every image computed once at the stage's start,
    no teacher runs in a training step, and the TA and the student come out as with the online teachers."""
    def fit(cache: bool, root: str):
        L.seed_everything(0)
        model = path_module(mlp_teacher, stage_epochs=(2, 2), cache_teacher_outputs=cache)
        stepping, forwards = in_training_losses(model), []
        for network in (model.teacher, model.assistants[0]):  # counted while it teaches in a training step
            network.register_forward_hook(
                lambda module, *_: forwards.append(module) if stepping[0] and module is model.active_teacher() else None)
        trainer = tiny_trainer(tmp_path / root, max_epochs=4)
        trainer.fit(model, datamodule=fake_datamodule(**FAKE, augment="cifar", device_resident=True))
        return model, forwards

    cached, cached_forwards = fit(True, "cached")
    online, online_forwards = fit(False, "online")
    assert cached_forwards == [] and len(online_forwards) > 0
    assert cached.cached_logits.shape == (128, 18, 10)  # the student stage's teacher: the TA
    assert len(list((tmp_path / "teacher_cache").glob("*.safetensors"))) == 2  # the teacher's and the TA's
    for network in ("assistants", "student"):
        for (name, a), b in zip(getattr(cached, network).state_dict().items(),
                                getattr(online, network).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{network}.{name}")
