"""Runs that survive: kill and resume, pre-emption, non-finite losses, determinism, DDP parity,
untrusted files and bad configs (issue 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, fake_datamodule, tiny_trainer, write_teacher
from distill.cli import main
from distill.errors import CheckpointError, NonFiniteLossError
from distill.methods import Supervised
from distill.tools import killtest
from distill.reliability.checkpoints import write_atomic
from distill.teachers import safe_torch_load

VOLATILE = ("wall_time_s", "train_images_per_s", "started_at", "finished_at", "run_dir", "model_file", "best_checkpoint",
            "config", "resumed_from")


def tiny_config(tmp_path: Path, method: str = "Supervised", epochs: int = 3, **data) -> Path:
    config = killtest.method_config(method, tmp_path, epochs)
    config["data"].update(fake_sizes=[128, 32, 32], **data)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(*args: str):
    return main(["fit", *args])


# ----------------------------------------------------------------------------- kill and resume
def test_kill_and_resume_small(tmp_path):
    """SIGKILLed before its first checkpoint (started again with the command the refused resume names), pre-empted
    mid-epoch (SIGTERM), then SIGKILLed while writing a checkpoint, resumed each time: the final results.json and
    weights equal an uninterrupted run's."""
    # six epochs: the SIGTERM falls within one epoch after the first checkpoint, so five epochs (not two)
    # stand between it and the end of training, however fast this machine runs the tiny epochs
    log = killtest.check_method("BaselineKD", tmp_path, kills=2, seed=0, epochs=6, train_size=256,
                                in_process=True, verbose=False)
    assert log[0] == "SIGKILL before the first checkpoint", log
    assert log[1].startswith("SIGTERM") and log[2].startswith("SIGKILL during a checkpoint write"), log
    assert "intact" in log[2] and "equal the uninterrupted" in log[-1], log


@pytest.mark.slow
def test_kill_and_resume_every_method(tmp_path):
    """The full harness, `python -m distill.tools.killtest`: every method in every setting (generated data, image
    files with workers, augmentation and dropout, the teacher cache, two-process DDP); about 27 minutes."""
    assert killtest.main(["--workdir", str(tmp_path / "killtest"), "--kills", "4"]) == 0


def test_killtest_builds_a_methods_config_from_its_base_classes(tmp_path, monkeypatch):
    """The kill test reads the registry: a method without an entry in EXTRA_INIT_ARGS (DKD, or a new
    staged one) gets SGD, the teacher file of a TeacherStudentModule and the stages of a StagedModule."""
    from distill.methods import METHODS, PatientConsistentKD, StagedModule, TeacherAssistantKD

    assert killtest.METHODS == tuple(METHODS) and "DKD" not in killtest.EXTRA_INIT_ARGS
    assert killtest.STAGED == tuple(name for name, cls in METHODS.items() if issubclass(cls, StagedModule))
    dkd = killtest.method_config("DKD", tmp_path, 8)["model"]
    assert dkd == {"class_path": "distill.methods.DKD", "init_args": {
        "student": "mlp_30_30", "teacher": str(tmp_path / "teacher-1x8.safetensors"),
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}}}
    assert (tmp_path / "teacher-1x8.safetensors").exists()
    assert killtest.brings_own_recipe(PatientConsistentKD) and not killtest.brings_own_recipe(METHODS["DKD"])
    assert "optimizer" not in killtest.method_config("PatientConsistentKD", tmp_path, 8)["model"]["init_args"]

    class NewStaged(TeacherAssistantKD):
        pass

    monkeypatch.setitem(killtest.REGISTRY, "NewStaged", NewStaged)
    staged = killtest.method_config("NewStaged", tmp_path, 7)["model"]["init_args"]
    assert staged["stage_epochs"] == [3, 4] and "teacher" in staged and "assistants" not in staged


def test_killtest_settings_add_images_workers_dropout_caches_and_ddp(tmp_path):
    """What each setting of the extended kill test changes, read from the methods' own classes."""
    images = killtest.method_config("DKD", tmp_path, 8, setting="images")
    assert images["data"]["dataset"] == "imagefolder" and images["data"]["num_workers"] == 2
    assert images["data"]["augment"] == "cifar" and images["model"]["init_args"]["student_kwargs"] == {"dropout": 0.2}
    assert len(list((tmp_path / "images" / "train").glob("*/*.png"))) == 480
    assert killtest.method_config("PatientConsistentKD", tmp_path, 8, setting="images")["data"]["augment"] == "none"
    assert killtest.method_config("BaselineKD", tmp_path, 8, setting="cache")["model"]["init_args"][
        "cache_teacher_outputs"] is True
    assert killtest.method_config("PatientConsistentKD", tmp_path, 8, setting="cache")["model"]["init_args"][
        "teaching"] == "fixed"
    assert [m for m in killtest.METHODS if killtest.applies(m, "cache")] == [
        "BaselineKD", "TeacherAssistantKD", "PatientConsistentKD"]
    assert killtest.method_config("Supervised", tmp_path, 8, setting="ddp")["trainer"]["devices"] == 2


def test_killtest_refuses_a_work_directory_it_did_not_make(tmp_path, capsys):
    """The harness empties its work directory: one holding other files is refused before anything is deleted;
    its own (marked) directory is emptied in place, so it can be the working directory."""
    (tmp_path / "notes.txt").write_text("a user's file")
    assert killtest.main(["--workdir", str(tmp_path), "--methods", "Supervised"]) == 2
    assert "holds files that no killtest wrote" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "a user's file"
    own = tmp_path / "own"
    killtest.prepare_workdir(own)
    (own / "runs").mkdir()
    killtest.prepare_workdir(own)
    assert own.is_dir() and [p.name for p in own.iterdir()] == [killtest.WORKDIR_MARKER]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    write_atomic({"step": torch.tensor(1)}, path)
    good = path.read_bytes()

    def dies_midway(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_atomic({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_continues_in_the_same_run_directory(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=2)
    first = Path(fit("--config", str(config), "--trainer.max_epochs=1").results["run_dir"])
    (first / "results.json").rename(first / "results-1.json")  # what the first segment wrote
    original = (first / "config.yaml").read_bytes()
    # the first segment's fit time travels in the checkpoint; a large one tells the sum from the second's alone
    last = first / "checkpoints" / "last.ckpt"
    checkpoint = safe_torch_load(last)
    (throughput,) = [state for key, state in checkpoint["callbacks"].items() if "TrainingThroughput" in key]
    assert 0 < throughput["wall_s"] < json.loads((first / "results-1.json").read_text())["wall_time_s"]
    throughput["wall_s"] = carried_wall = 1000.0
    torch.save(checkpoint, last)
    started = time.time()
    resumed = fit("--resume", str(first), "--trainer.max_epochs=2").results
    resume_seconds = time.time() - started
    assert Path(resumed["run_dir"]) == first and resumed["epochs"] == 2
    assert resumed["resumed_from"] == str(first / "checkpoints" / "last.ckpt")
    assert (first / "config.yaml").read_bytes() == original  # kept; the resume's own config beside it
    assert yaml.safe_load((first / "config.resume-1.yaml").read_text())["trainer"]["max_epochs"] == 2
    from distill.cli import resume_arguments  # a later resume starts from the newest config
    assert resume_arguments(["fit", "--resume", str(first)])[:3] == ["fit", "--config", str(first / "config.resume-1.yaml")]
    epochs = [row.split(",") for row in (first / "metrics.csv").read_text().splitlines()]
    header = epochs[0]
    assert {0, 1} <= {int(float(r[header.index("epoch")])) for r in epochs[1:] if r[header.index("epoch")]}  # rows kept
    assert carried_wall < resumed["wall_time_s"] < carried_wall + resume_seconds  # both segments' fit time


def test_a_signal_after_training_preempts_the_test_and_a_resume_finishes_it(tmp_path, monkeypatch, capsys):
    """SIGTERM between the end of training and results.json: exit 0 with the resume command, results.json
    not written; the resume only tests and exports, and gives the uninterrupted run's results."""
    import os
    import signal

    import distill.cli

    config = tiny_config(tmp_path, epochs=2)
    reference = fit("--config", str(config)).results
    real_finish_fit = distill.cli.finish_fit

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends while the best checkpoint is tested
        return real_finish_fit(*args, **kwargs)

    monkeypatch.setattr(distill.cli, "finish_fit", signalled)
    with pytest.raises(SystemExit) as stopped:
        fit("--config", str(config))
    assert stopped.value.code == 0
    message = capsys.readouterr().err
    assert "pre-empted by SIGTERM after training" in message and "distill fit --resume" in message
    run_dir = Path(message.split("distill fit --resume ")[-1].split()[0])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(distill.cli, "finish_fit", real_finish_fit)
    resumed = fit("--resume", str(run_dir)).results
    assert Path(resumed["run_dir"]) == run_dir
    for key in ("best_val_acc", "test_acc", "epochs"):
        assert resumed[key] == reference[key], key


@pytest.mark.parametrize("moment", ["setup", "after"])
def test_a_sigterm_outside_training_cleans_up_and_says_what_is_left(moment, tmp_path, monkeypatch, capsys):
    """SIGTERM while a run is being set up (after its directory is claimed, before training): the directory is
    given back, one line says to run the command again, exit 143. After the run finished: exit 0, results kept.
    Before, the default handler ended the process there and left a version directory nothing could resume."""
    import os
    import signal

    import distill.cli

    config = tiny_config(tmp_path, epochs=1)
    target = distill.cli.ResumeAwareSaveConfig if moment == "setup" else distill.cli.DistillCLI
    name = "setup" if moment == "setup" else "after_fit"
    real = getattr(target, name)

    def signalled(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's SIGTERM right then
        return result

    monkeypatch.setattr(target, name, signalled)
    with pytest.raises(SystemExit) as stopped:
        fit("--config", str(config))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    runs = list((tmp_path / "runs").glob("*/*/version_*"))
    if moment == "setup":
        assert stopped.value.code == 143 and "before training started; nothing was kept" in message
        assert runs == []
    else:
        assert stopped.value.code == 0 and "after the run had finished" in message
        assert [(run / "results.json").is_file() for run in runs] == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_it_again(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    run_dir = tmp_path / "runs" / "killed" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.read_text())  # what SIGKILL in the first epoch leaves
    with pytest.raises(SystemExit) as refused:
        fit("--resume", str(run_dir))
    message = capsys.readouterr().err
    assert refused.value.code == 2 and "stopped before its first checkpoint" in message
    assert f"distill fit --config {run_dir / 'config.yaml'}" in message


# ----------------------------------------------------------------------------- non-finite losses
class NaNAt(Supervised):
    """Supervised whose cross-entropy becomes NaN at the given global steps (a blown-up batch)."""

    def __init__(self, bad_steps: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_steps = set(bad_steps)

    def training_losses(self, batch):
        logits, losses = super().training_losses(batch)
        if self.global_step in self.bad_steps and not getattr(self, "_counted", None) == self.global_step:
            self._counted = self.global_step
            losses = {"loss_ce": losses["loss_ce"] * float("nan"), "loss": losses["loss"] * float("nan")}
        return logits, losses


def _nan_module(bad_steps):
    return NaNAt(bad_steps, student="mlp_30_30", num_classes=10, in_channels=3, image_size=16)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=3)  # 3 batches per epoch: step 4 is in epoch 1
    with pytest.raises(NonFiniteLossError, match=r"global step 4 \(epoch 1, batch 1\): loss_ce = nan") as info:
        trainer.fit(_nan_module([4]), datamodule=fake_datamodule())
    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert str(last) in str(info.value) and "--nonfinite_loss skip" in str(info.value)
    assert safe_torch_load(last)["global_step"] == 3  # the end of epoch 0, intact


def test_nonfinite_loss_skip_counts_the_skipped_batches(tmp_path):
    class WeightsAround(L.Callback):  # the student's weights before and after every batch
        def __init__(self):
            self.changed = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = [p.detach().clone() for p in module.student.parameters()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.changed.append(any(not torch.equal(a, b) for a, b in zip(self.before, module.student.parameters())))

    model = _nan_module([1, 4])
    model.nonfinite_loss = "skip"
    watcher = WeightsAround()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[watcher])
    trainer.fit(model, datamodule=fake_datamodule())
    assert model.skipped_nonfinite == 2
    assert watcher.changed == [True, False, True, True, False, True]  # no update from the skipped batches
    assert all(torch.isfinite(v).all() for v in model.student.state_dict().values())
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("train/skipped_nonfinite")
    assert [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]] == [1.0, 2.0]


def test_a_nonfinite_loss_is_read_within_a_few_steps_and_named_by_its_own_step(tmp_path):
    """The losses are read on the host every READ_EVERY steps (no synchronisation per step): a NaN at step 2 of a
    20-step epoch stops the run within READ_EVERY steps, naming step 2, not the step that read it."""
    from distill.reliability.nonfinite import READ_EVERY

    model = _nan_module([2])
    steps = []
    model.training_losses = lambda batch, real=model.training_losses: steps.append(batch.batch_idx) or real(batch)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"global step 2 \(epoch 0, batch 2\): loss_ce = nan"):
        trainer.fit(model, datamodule=fake_datamodule(fake_sizes=[640, 32, 32]))
    assert 2 < len(steps) <= READ_EVERY < 20, steps


def test_a_nonfinite_part_that_is_only_logged_does_not_stop_the_run(tmp_path):
    """The total loss decides (as for skipping): a NaN in a part that is only logged trains on."""
    class LoggedNaN(Supervised):
        def training_losses(self, batch):
            logits, losses = super().training_losses(batch)
            return logits, {**losses, "probe": torch.tensor(float("nan"))}

    model = LoggedNaN(student="mlp_30_30", num_classes=10, in_channels=3, image_size=16)
    tiny_trainer(tmp_path, max_epochs=2).fit(model, datamodule=fake_datamodule())
    assert model.global_step == 6 and all(torch.isfinite(v).all() for v in model.student.state_dict().values())


def test_no_checkpoint_is_written_from_weights_a_nonfinite_step_touched(tmp_path):
    """A checkpoint every step: the save after the NaN step reads the pending losses first and stops the run, so
    the newest checkpoint holds the weights from before it, all finite."""
    class EveryStep(L.Callback):  # (a ModelCheckpoint here would be replaced by the method's own)
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.save_checkpoint(tmp_path / "steps" / f"{trainer.global_step}.ckpt")

    every_step = EveryStep()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[every_step])
    with pytest.raises(NonFiniteLossError, match=r"global step 5 \(epoch 0, batch 5\)"):
        trainer.fit(_nan_module([5]), datamodule=fake_datamodule(fake_sizes=[640, 32, 32]))
    saved = {safe_torch_load(path)["global_step"]: safe_torch_load(path)["state_dict"]
             for path in (tmp_path / "steps").glob("*.ckpt")}
    assert sorted(saved) == [1, 2, 3, 4, 5]  # step 5's weights are those before the NaN batch's update
    assert all(torch.isfinite(v).all() for state in saved.values() for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_results(tmp_path):
    config = tiny_config(tmp_path, epochs=2, augment="jitter")  # random augmentation included
    runs = [json.loads((Path(fit("--config", str(config)).results["run_dir"]) / "results.json").read_text())
            for _ in range(2)]
    assert runs[0]["run_dir"] != runs[1]["run_dir"]
    assert runs[0]["seed"] == 7 and runs[0]["config"]["seed_everything"] == 7
    assert {k: v for k, v in runs[0].items() if k not in VOLATILE} == {k: v for k, v in runs[1].items() if k not in VOLATILE}
    weights = [load_file(str(Path(r["run_dir"]) / "model.safetensors")) for r in runs]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())


# ----------------------------------------------------------------------------- DDP parity
@pytest.mark.slow  # about 70 s on the 2-core development machine: two DDP processes start up
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """2 gloo CPU processes × batch 16 against 1 process × batch 32: the same images in each step
    (EpochShuffle shards one permutation), so the mean of the two processes' losses is the
    one-process loss step by step, and the weights after the run agree."""
    config = tiny_config(tmp_path, epochs=1)
    callback = ["--trainer.callbacks+=reliability_helpers.StepLosses", "--trainer.callbacks.steps=4"]
    single = fit("--config", str(config), "--data.batch_size=32", *callback,
                 f"--trainer.callbacks.out={tmp_path / 'one'}").results
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("DISTILL_RUN_DIR", None)
    result = subprocess.run([sys.executable, "-m", "distill.cli", "fit", "--config", str(config),
                             "--data.batch_size=16", "--trainer.devices=2", "--trainer.strategy=ddp",
                             *callback, f"--trainer.callbacks.out={tmp_path / 'two'}"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "losses-rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"losses-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(one) == 4
    assert torch.allclose(torch.tensor(one), (torch.tensor(ranks[0]) + torch.tensor(ranks[1])) / 2, atol=1e-5)
    assert not torch.allclose(torch.tensor(ranks[0]), torch.tensor(ranks[1]))  # the ranks saw different images
    two_dir = sorted(Path(single["run_dir"]).parent.glob("version_*"))[-1]
    a, b = load_file(single["model_file"]), load_file(str(two_dir / "model.safetensors"))
    assert all(torch.allclose(v, b[k], atol=1e-5) for k, v in a.items())


# ----------------------------------------------------------------------------- untrusted files
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("role", ["teacher", "checkpoint"])
def test_malicious_pickle_is_refused_and_never_runs(role, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"student": "mlp_30_30"}, "x": Payload(marker)}, evil)
    config = tiny_config(tmp_path, "BaselineKD")
    extra = ["--model.init_args.teacher", str(evil)] if role == "teacher" else ["--ckpt_path", str(evil)]
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", str(config), *extra)
    assert exit_info.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"distill: error: refusing to load {evil}") and ".safetensors" in err, err
    assert not (tmp_path / "runs" / "killed").exists()
    with pytest.raises(CheckpointError, match="could execute code"):
        safe_torch_load(evil)


def test_checkpoints_load_weights_only_and_safetensors_teachers_work(tmp_path):
    config = tiny_config(tmp_path, "BaselineKD", epochs=1)  # its teacher is a .safetensors file
    run = Path(fit("--config", str(config)).results["run_dir"])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "RunGuard" in checkpoint["callbacks"] and "teacher.0.weight" not in checkpoint["state_dict"]


# ----------------------------------------------------------------------------- bad configs
BAD = {
    "wrong type": (["--trainer.max_epochs=abc"], 'Parser key "trainer.max_epochs": Expected a <class \'int\'>'),
    "unknown key": (["--model.init_args.temprature=3"], "Option 'temprature' is not accepted"),
    "missing required field": (["--model.init_args.student=null"], "student"),
    "TA of other classes": (["--model.init_args.assistant_checkpoints=[ta100.safetensors]",
                             "--model.init_args.stage_epochs=[0,2]"], "ta100.safetensors was trained for 100 classes"),
    "resume of no run": (["--resume", "runs/nothing/version_0"], "cannot resume runs/nothing/version_0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_one_line_error_before_any_work(case, tmp_path, capsys):
    write_teacher(tmp_path / "ta100.safetensors", model="mlp_300_300", num_classes=100, in_channels=1, image_size=8)
    config = tiny_config(tmp_path, "TeacherAssistantKD", epochs=2)
    args, expected = BAD[case]
    with pytest.raises(SystemExit) as exit_info:
        fit(*(args if case == "resume of no run" else ["--config", str(config), *args]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distill: error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_epoch_shuffle_shards_one_global_order():
    """Rank r of W takes every W-th sample of the single-process order: DDP step b with batch B sees
    the images of single-process step b with batch B·W. skip_next resumes mid-epoch."""
    from distill.data.splits import EpochShuffle

    data, batch = list(range(40)), 4
    single = EpochShuffle(data, seed=3)
    single.set_epoch(2)
    order = list(single)
    shards = []
    for rank in (0, 1):
        sampler = EpochShuffle(data, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    for step in range(len(data) // (2 * batch)):
        together = shards[0][step * batch:(step + 1) * batch] + shards[1][step * batch:(step + 1) * batch]
        assert sorted(together) == sorted(order[step * 2 * batch:(step + 1) * 2 * batch])
    single.skip_next(12)
    assert list(single) == order[12:] and list(single) == order  # the skip applies to one pass only


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", ["epoch end", "mid-epoch"])
def test_resume_with_random_augmentation_and_dropout_is_exact(stop, workers, tmp_path, capsys):
    """A resumed run draws the same crops, flips and dropout masks as an uninterrupted one, from an epoch's end or
    from the middle of one (pre-empted by SIGTERM), in the training process or in DataLoader workers. With workers,
    each image's augmentation is seeded by (seed, epoch, index), and the resumed iterator is made once the sampler is
    placed (Lightning makes it before it sets the epoch, and workers take their first indices at once): both
    failed before, the mid-epoch case also without the epoch's end."""
    config = tiny_config(tmp_path, epochs=3, augment="cifar", num_workers=workers)
    dropout = ["--model.init_args.student=mlp", "--model.init_args.student_kwargs={hidden: [64], dropout: 0.3}"]
    whole = fit("--config", str(config), *dropout, "--run_name=whole").results
    if stop == "epoch end":
        cut = fit("--config", str(config), *dropout, "--run_name=cut", "--trainer.max_epochs=2").results
        resumed = fit("--resume", cut["run_dir"], "--trainer.max_epochs=3").results
    else:  # 8 steps an epoch: stopped after step 11, in the middle of the second epoch
        with pytest.raises(SystemExit) as preempted:
            fit("--config", str(config), *dropout, "--run_name=cut",
                "--trainer.callbacks=[{class_path: conftest.SigtermAt, init_args: {step: 11}}]")
        assert preempted.value.code == 0 and "pre-empted by SIGTERM at epoch 1, step 12" in capsys.readouterr().err
        (cut_dir,) = (tmp_path / "runs" / "cut").glob("version_*")
        resumed = fit("--resume", str(cut_dir), "--trainer.callbacks=[]").results
    a, b = load_file(whole["model_file"]), load_file(resumed["model_file"])
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert resumed["test"] == whole["test"]


@pytest.mark.parametrize("method", ["TeacherAssistantKD", "TeacherAssistantKD+cache", "ResidualKD",
                                    "PatientConsistentKD"])
def test_every_method_resumes_exactly_in_process(method, tmp_path):
    """Stopped after 3 of 4 epochs (the staged methods in their second stage) and resumed: the same
    weights and test metrics as the uninterrupted run (PatientConsistentKD redraws the same crops and mixup;
    TeacherAssistantKD+cache finds its trained assistant's cached outputs again)."""
    config = tiny_config(tmp_path, method=method.removesuffix("+cache"), epochs=4)  # 128 images, batch 16: 8 steps an epoch
    if method.endswith("+cache"):
        spec = yaml.safe_load(config.read_text())
        spec["model"]["init_args"]["cache_teacher_outputs"] = True
        config.write_text(yaml.safe_dump(spec))
    whole = fit("--config", str(config), "--run_name=whole").results
    # stopped by a callback, not by max_epochs/max_steps, which would change the learning-rate schedules
    stop = '--trainer.callbacks=[{class_path: conftest.StopAfter, init_args: {epochs: 3}}]'
    cut = fit("--config", str(config), "--run_name=cut", stop).results
    assert cut["epochs"] == 3
    resumed = fit("--resume", cut["run_dir"], "--trainer.callbacks=[]").results
    a, b = load_file(whole["model_file"]), load_file(resumed["model_file"])
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    assert resumed["test"] == whole["test"] and resumed["best_val_acc"] == whole["best_val_acc"]
    assert resumed.get("stages") == whole.get("stages") or [
        {k: s[k] for k in ("stage", "best_val_acc", "test_acc")} for s in resumed["stages"]] == [
        {k: s[k] for k in ("stage", "best_val_acc", "test_acc")} for s in whole["stages"]]


SAVE_IN_A_NEW_PROCESS = """
import sys, torch
from distill.models import create_model
from distill.teachers import NetworkSpec, save_network
torch.manual_seed(0)
network = create_model("mlp_30_30", num_classes=10, in_channels=1, image_size=8)
spec = NetworkSpec(model="mlp_30_30", num_classes=10, in_channels=1, image_size=8)
save_network(network, spec, sys.argv[1], best_val_acc=0.5, test_acc=0.25, note="x")
"""


def test_an_export_has_the_same_bytes_in_every_process_and_is_not_rewritten_when_unchanged(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes per process: the same network saved in two
    processes had two sha256s, so a run distilled from it could no longer resume after its teacher was re-exported."""
    import hashlib
    import subprocess
    import sys

    from distill.teachers import load_network

    files = [tmp_path / f"model{i}.safetensors" for i in range(3)]
    for path in files:  # fresh interpreters: a new hash seed each
        subprocess.run([sys.executable, "-c", SAVE_IN_A_NEW_PROCESS, str(path)], check=True)
    digests = {hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    assert len(digests) == 1
    loaded = load_network(files[0], None, num_classes=10, in_channels=1, image_size=8)
    assert loaded.describe()["model"] == "mlp_30_30"
    before = files[0].stat()
    subprocess.run([sys.executable, "-c", SAVE_IN_A_NEW_PROCESS, str(files[0])], check=True)
    after = files[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # left as it was


def test_a_resume_keeps_the_runs_arguments_and_finds_its_teacher_by_content(tmp_path, capsys):
    """Method arguments given on --resume are refused with the reason (Lightning would drop them silently); the
    teacher is the file the run started with, even after `latest` moved to a retrained teacher."""
    teacher_config = tiny_config(tmp_path, epochs=1)
    first_teacher = fit("--config", str(teacher_config), "--run_name", "t").results["model_file"]
    latest = str(Path(first_teacher).parent.parent / "latest" / "model.safetensors")
    kd_config = tiny_config(tmp_path, method="BaselineKD", epochs=1)
    kd = Path(fit("--config", str(kd_config), "--model.init_args.teacher", latest, "--run_name", "kd").results["run_dir"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        fit("--resume", str(kd), "--trainer.max_epochs=2", "--model.init_args.temperature", "8")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a resumed run continues with the method arguments it started with" in error
    assert "temperature (given 8.0, the run's 4.0)" in error and f"--config {kd / 'config.yaml'}" in error
    assert not (kd / "config.resume-1.yaml").exists()  # refused before anything was written
    # the teacher retrained: `latest` now names another file
    fit("--config", str(teacher_config), "--run_name", "t", "--seed_everything", "1")
    assert Path(latest).resolve() != Path(first_teacher).resolve()
    resumed = fit("--resume", str(kd), "--trainer.max_epochs=2").results
    assert "is no longer the teacher this run started with; resuming with that file" in capsys.readouterr().err
    assert resumed["epochs"] == 2 and resumed["teacher"]["sha256"] == json.loads(
        (kd / "results.json").read_text())["teacher"]["sha256"]
    assert Path(resumed["teacher"]["path"]).resolve() == Path(first_teacher).resolve()
    # naming the original file explicitly is the same teacher: accepted
    again = fit("--resume", str(kd), "--trainer.max_epochs=3", "--model.init_args.teacher", first_teacher).results
    assert again["epochs"] == 3 and again["teacher"]["path"] == first_teacher


def test_a_refused_resume_names_the_command_of_a_new_run_from_its_weights_which_starts_there(tmp_path, capsys):
    """The command a refused resume names starts a new run whose student begins with the stopped run's weights
    (checked with a learning rate of 0: the export is those weights), recorded with their sha256; a file of
    another network is one error before any run directory."""
    from distill.teachers import sha256_of

    config = tiny_config(tmp_path, method="BaselineKD", epochs=1)
    run = Path(fit("--config", str(config), "--run_name", "kd").results["run_dir"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        fit("--resume", str(run), "--model.init_args.temperature", "8")
    command = capsys.readouterr().err.split("from this run's weights: distill fit ")[1].split(" (without")[0].split()
    assert command[:4] == ["--config", str(run / "config.yaml"), "--model.init_args.student_init",
                           str(run / "checkpoints" / "last.ckpt")]
    frozen = ["--model.init_args.optimizer.init_args.lr", "0", "--run_name", "from_weights"]
    new = fit(*command, *frozen).results
    assert Path(new["run_dir"]).parent.name == "from_weights" and new["student_init"] == {
        "path": str(run / "checkpoints" / "last.ckpt"), "sha256": sha256_of(run / "checkpoints" / "last.ckpt")}
    started, ended = load_file(str(run / "model.safetensors")), load_file(new["model_file"])
    assert started.keys() == ended.keys() and all(torch.equal(v, ended[k]) for k, v in started.items())
    assert new["config"]["model"]["init_args"]["temperature"] == 8.0
    with pytest.raises(SystemExit) as refused:
        fit("--config", str(config), "--model.init_args.student=mlp_300_300",
            "--model.init_args.student_init", str(run / "model.safetensors"), "--run_name", "wrong")
    assert refused.value.code == 2 and "holds a 'mlp_30_30' network" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "wrong").exists()


def test_resuming_a_finished_run_that_would_train_no_further_copies_and_writes_nothing(tmp_path, capsys):
    """`--resume` (or `--ckpt_path`) of a finished run under limits it has reached says so and exits 0, instead of
    copying the run into a new version only to test it again (and moving `latest` there)."""
    config = tiny_config(tmp_path, epochs=1)
    first = Path(fit("--config", str(config), "--run_name", "x").results["run_dir"])
    capsys.readouterr()
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*"))
    for limits in ([], ["--trainer.max_epochs=1"], ["--trainer.max_epochs=5", "--trainer.max_steps=1"]):
        with pytest.raises(SystemExit) as done:
            fit("--resume", str(first), *limits)
        err = capsys.readouterr().err
        assert done.value.code == 0 and err.startswith(f"distill: {first} has finished (1 epochs"), limits
        assert f"nothing was copied or written. To train it longer: distill fit --resume {first} " in err
    with pytest.raises(SystemExit) as done:
        fit("--config", str(first / "config.yaml"), "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    assert done.value.code == 0 and "has finished" in capsys.readouterr().err
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*")) == before


def test_resuming_a_finished_staged_run_whose_stages_set_its_length_writes_nothing(tmp_path, capsys):
    """A staged run's length is its stages' (no trainer.max_epochs in its config): resuming it when finished
    writes nothing, like any finished run."""
    path = tiny_config(tmp_path, method="TeacherAssistantKD", epochs=2)
    config = yaml.safe_load(path.read_text())
    del config["trainer"]["max_epochs"]
    path.write_text(yaml.safe_dump(config))
    first = Path(fit("--config", str(path), "--run_name", "takd").results["run_dir"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        fit("--resume", str(first))
    assert done.value.code == 0 and "has finished (2 epochs" in capsys.readouterr().err
    assert sorted(p.name for p in first.parent.iterdir()) == ["latest", first.name]


def test_extending_a_finished_run_makes_a_new_version_and_latest_stays_on_the_newest(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    first = Path(fit("--config", str(config), "--run_name", "x").results["run_dir"])
    kept = {name: (first / name).read_bytes() for name in ("results.json", "model.safetensors", "config.yaml")}
    extended = fit("--resume", str(first), "--trainer.max_epochs=2").results
    second = Path(extended["run_dir"])
    assert second == first.parent / "version_1" and extended["epochs"] == 2
    assert extended["extended_from"] == str(first)  # where it came from
    assert json.loads((second / "results.json").read_text())["extended_from"] == str(first)
    assert {name: (first / name).read_bytes() for name in kept} == kept  # the finished run is untouched
    assert (first.parent / "latest").resolve() == second.resolve()
    # an older run that finishes after a newer one does not take `latest` back
    stopped = Path(fit("--config", str(config), "--run_name", "x").results["run_dir"])  # version_2
    (stopped / "results.json").rename(stopped / "results-interrupted.json")  # as if stopped before its end
    newest = Path(fit("--config", str(config), "--run_name", "x").results["run_dir"])  # version_3
    finished = Path(fit("--resume", str(stopped)).results["run_dir"])
    assert finished == stopped and (stopped / "results.json").is_file()
    assert (first.parent / "latest").resolve() == newest.resolve()


def test_a_damaged_last_checkpoint_resumes_from_the_newest_intact_one_and_is_replaced(tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1)
    run = Path(fit("--config", str(config)).results["run_dir"])
    (run / "results.json").rename(run / "results-stopped.json")  # as if stopped before its end
    last = run / "checkpoints" / "last.ckpt"
    damaged = last.read_bytes()[:300]
    last.write_bytes(damaged)  # truncated
    (best,) = [p for p in (run / "checkpoints").glob("best-*.ckpt")]
    resumed = fit("--resume", str(run), "--trainer.max_epochs=2").results
    err = capsys.readouterr().err
    assert f"{last} is damaged (cannot read {last}" in err and f"resuming from {best}" in err
    assert resumed["run_dir"] == str(run) and resumed["epochs"] == 2 and resumed["resumed_from"] == str(best)
    assert safe_torch_load(last)["epoch"] == 1  # the recovered run's last.ckpt took the damaged one's place
    assert (run / "checkpoints" / "last.ckpt.damaged").read_bytes() == damaged  # kept, not lost
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))
    # nothing intact: one error naming what is there
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"garbage")
    (run / "results.json").rename(run / "results-again.json")
    with pytest.raises(SystemExit):
        fit("--resume", str(run))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot resume: cannot read" in error and "no other checkpoint" in error and "best-epoch" in error


def test_a_latest_that_is_a_real_folder_is_left_alone_and_said(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    mine = tmp_path / "runs" / "y" / "latest"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="latest is not a link, so it was not pointed at"):
        fit("--config", str(config), "--run_name", "y")
    assert (mine / "notes.txt").read_text() == "mine" and not mine.is_symlink()


def test_unwritable_output_and_a_full_disk_are_one_line_errors_and_keep_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                          capsys):
    import errno

    from distill.reliability import checkpoints

    config = tiny_config(tmp_path, epochs=2)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", str(config), "--trainer.default_root_dir", str(tmp_path / "a_file" / "runs"))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert error.startswith("distill: error: cannot write ") and "a part of its path is a file, not a folder" in error
    saves, real_save = [], torch.save

    def full_disk_after_the_first_epoch(obj, handle, *args, **kwargs):
        saves.append(handle)
        if len(saves) > 2:  # the first epoch's best and last checkpoints were written
            raise OSError(errno.ENOSPC, "No space left on device", getattr(handle, "name", None))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", full_disk_after_the_first_epoch)
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", str(config), "--run_name", "full")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "No space left on device; free some space" in error
    assert "distill fit --resume RUN_DIR" in error
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    (last,) = (tmp_path / "runs" / "full").glob("version_*/checkpoints/last.ckpt")
    assert safe_torch_load(last)["epoch"] == 0  # the checkpoint before the full disk, intact
