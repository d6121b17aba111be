"""End-to-end runs of the `distill` command on small data, and its handling of bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, write_teacher
from distill.cli import DistillCLI, config_lines, main, recipe_arguments
from distill.methods import METHODS
from test_cli_recipe import config_files

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CONFIGS = REPO / "configs"
DISTILL = Path(sys.executable).with_name("distill")


def fit(config: str, *extra: str) -> DistillCLI:
    return main(["fit", "--config", str(CONFIGS / config), *QUIET, *extra])


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def test_mnist5k_teacher_then_kd_end_to_end(tmp_path, capsys):
    teacher = fit("mnist5k/teacher.yaml", "--trainer.max_epochs=1")
    run_dir = Path(teacher.results["run_dir"])
    assert run_dir == Path("runs/mnist5k/teacher/version_0")
    assert "Run directory: runs/mnist5k/teacher/version_0" in capsys.readouterr().out

    # kd.yaml names the teacher through runs/mnist5k/teacher/latest
    kd = fit("mnist5k/kd.yaml", "--trainer.max_epochs=2")
    kd_dir = Path(kd.results["run_dir"])
    results = json.loads((kd_dir / "results.json").read_text())
    assert results["method"] == "BaselineKD" and results["epochs"] == 2 and results["seed"] == 0
    assert results["teacher"]["path"] == "runs/mnist5k/teacher/latest/model.safetensors"
    assert 0.5 < results["test_acc"] <= 1.0 and 0.5 < results["best_val_acc"] <= 1.0
    assert results["config"]["model"]["init_args"]["temperature"] == 4.0
    assert results["config"]["model"]["init_args"]["num_classes"] == 10  # linked from the data
    assert yaml.safe_load((kd_dir / "config.yaml").read_text())["seed_everything"] == 0
    assert list(kd_dir.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(kd_dir / "metrics.csv")))
    columns = set(rows[0])
    assert {"val/acc", "val/agreement", "val/kl", "train/loss_kd_epoch", "train/loss_ce_epoch", "lr"} <= columns
    assert (kd_dir / "model.safetensors").is_file()

    # a second run of the same config gets a new directory; the first is untouched
    before = tree_snapshot(kd_dir)
    again = fit("mnist5k/kd.yaml", "--trainer.max_epochs=1", "--seed_everything=1")
    assert Path(again.results["run_dir"]).name == "version_1" and tree_snapshot(kd_dir) == before


@pytest.fixture
def existing_run(tmp_path):
    """A finished-looking run the bad commands must leave alone."""
    run = tmp_path / "runs" / "mnist5k" / "kd" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    (run / "results.json").write_text("{}")
    return tmp_path / "runs"


BAD_INPUTS = {
    "unknown model": (["--model.init_args.student", "resnet2"], "resnet20"),
    "unknown data set": (["--data.dataset", "cifar11"], "cifar10"),
    "missing data directory": (["--data.dataset", "cifar10", "--data.data_dir", "nowhere"], "nowhere"),
    "missing teacher": (["--model.init_args.teacher", "missing.safetensors"], "missing.safetensors"),
    "temperature <= 0": (["--model.init_args.temperature", "0"], "temperature"),
    "alpha > 1": (["--model.init_args.alpha", "1.5"], "alpha"),
    "max_epochs 0": (["--trainer.max_epochs", "0"], "trainer.max_epochs=0 trains nothing"),
    "limit_train_batches 0": (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches=0 trains nothing"),
    # found in setup, after the run directory was claimed
    "teacher cache with augmentation": (["--model.init_args.cache_teacher_outputs", "true", "--data.augment", "jitter"],
                                        "cache_teacher_outputs"),
    # found when the optimiser is built, inside fit, after the run's config.yaml and event file were written
    "warm-up longer than the run": (["--model.init_args.lr_scheduler=distill.optim.WarmupCosine",
                                     "--model.init_args.lr_scheduler.warmup_steps=100000"], "warmup_steps=100000"),
    # found in prepare_data, inside fit (offline: the download fails)
    "data set to download": (["--data.dataset", "cifar100", "--data.data_dir", "nowhere", "--data.download", "true",
                              "--model.init_args.teacher", "none.safetensors", "--model", "Supervised"], "cifar100"),
}


def test_runs_of_one_name_started_at_once_claim_distinct_version_directories(tmp_path):
    import threading

    from distill.run import next_version_dir

    (tmp_path / "exp" / "kd" / "version_3").mkdir(parents=True)  # an earlier run
    start, claimed = threading.Barrier(12), []

    def claim() -> None:
        start.wait()
        claimed.append(next_version_dir(tmp_path, "exp/kd"))

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in claimed) == sorted(f"version_{n}" for n in range(4, 16))
    assert all(p.is_dir() and not any(p.iterdir()) for p in claimed)


@pytest.mark.parametrize("case", ["warm-up longer than the run", "data set to download"])
def test_the_first_run_of_a_name_refused_inside_fit_leaves_no_folder_of_that_name(case, tmp_path, capsys):
    """Refused after its run directory (and the folders of its name) were made: the refusal takes them all back, so
    that no empty runs/<data set>/<name>/ is left; the runs root itself stays."""
    args, expected = BAD_INPUTS[case]
    write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    with pytest.raises(SystemExit) as exit_info:
        fit("mnist5k/kd.yaml", "--model.init_args.teacher", "teacher.safetensors", "--run_name", "deep/name/kd", *args)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_run_stopped_before_writing_anything_gives_back_its_version_directory(monkeypatch, existing_run, capsys):
    from distill.errors import ConfigError

    def stop(self) -> None:
        raise ConfigError("stopped between claiming the run directory and training")

    monkeypatch.setattr(DistillCLI, "before_fit", stop)
    versions = sorted(existing_run.rglob("version_*"))
    with pytest.raises(SystemExit) as exit_info:
        fit("mnist5k/scratch.yaml")
    assert exit_info.value.code == 2 and "stopped between" in capsys.readouterr().err
    assert sorted(existing_run.rglob("version_*")) == versions


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error_nothing_touched(case, tmp_path, existing_run, capsys):
    args, expected = BAD_INPUTS[case]
    write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    before = tree_snapshot(existing_run)
    paths = sorted(existing_run.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        fit("mnist5k/kd.yaml", "--model.init_args.teacher", "teacher.safetensors", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("distill: error: ") and expected in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert tree_snapshot(existing_run) == before
    assert sorted(existing_run.rglob("*")) == paths  # not even an empty version directory left behind


@pytest.mark.parametrize("case", ["corrupt", "wrong classes", "unsafe pickle"])
def test_bad_teacher_files(case, tmp_path, existing_run, capsys):
    path = tmp_path / "teacher.pth"
    if case == "corrupt":
        path.write_bytes(b"garbage" * 100)
        expected = "cannot read"
    elif case == "wrong classes":
        path = write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", num_classes=100,
                             in_channels=1, image_size=28)
        expected = "100 classes"
    else:
        import torch
        torch.save({"model": {}, "hook": os.system}, path)
        expected = "refusing to load"
    before = tree_snapshot(existing_run)
    with pytest.raises(SystemExit) as exit_info:
        fit("mnist5k/kd.yaml", "--model.init_args.teacher", str(path))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert tree_snapshot(existing_run) == before


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run([str(DISTILL), "fit", "--config", str(CONFIGS / "mnist5k/scratch.yaml"),
                             "--model.init_args.student", "mlp_800"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("distill: error: unknown model 'mlp_800'") or \
        "mlp_800" in result.stderr.strip().splitlines()[-1]


def _trained_by(teacher: str) -> str | None:
    """The network of the config whose run writes ``teacher`` (``runs/<run_name>/...``), if one does."""
    for path in config_files()[0]:
        row = yaml.safe_load(path.read_text())
        if teacher.startswith(f"runs/{row['run_name']}/"):
            return row["model"]["init_args"]["student"]
    return None


def _config_overrides(config: Path, tmp_path: Path) -> list[str]:
    """Swap the config's data for generated data of the same shape, and its teacher for a generated one."""
    text = config_lines(config)  # the config's lines over its recipe's
    dataset = text["data"]["dataset"]
    shape = {"mnist5k": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "imagefolder": (10, 3, 32),
             "imagenet": (1000, 3, 32)}[dataset]
    overrides = ["--data.dataset", "fake", "--data.num_classes", str(shape[0]), "--data.in_channels",
                 str(shape[1]), "--data.image_size", str(shape[2]), "--data.download", "false",
                 "--data.val_fraction", "null", "--data.num_workers", "0", "--data.train_subset", "null"]
    init_args = text["model"]["init_args"]
    if "teacher_model" in init_args or "teacher" in init_args:
        # a .safetensors teacher records its network: the configs name it only for other files
        model = init_args.get("teacher_model") or _trained_by(init_args["teacher"]) or init_args["student"]
        teacher = write_teacher(tmp_path / "teacher.safetensors", model=model,
                                num_classes=shape[0], in_channels=shape[1], image_size=shape[2])
        overrides += ["--model.init_args.teacher", str(teacher)]
    return overrides


# <dataset>/patient/ configs need BiT networks of 24M-236M parameters: tests/test_patient.py checks them
# with small stand-ins.
RUN_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in config_files()[0] if "patient" not in p.parts)


@pytest.mark.parametrize("config", RUN_CONFIGS)
def test_every_config_parses_and_instantiates(config, tmp_path):
    path = CONFIGS / config
    cli = DistillCLI(args=[*recipe_arguments(["--config", str(path)]), *_config_overrides(path, tmp_path)], run=False)
    expected = config_lines(path)["model"]
    assert cli.model.__class__.__name__ == expected["class_path"].rsplit(".", 1)[-1]
    for key, value in expected["init_args"].items():
        if key not in ("teacher", "optimizer", "lr_scheduler"):
            assert cli.model.hparams[key] == value, key
    assert cli.model.configure_optimizers() is not None
    assert cli.trainer.max_epochs == config_lines(path)["trainer"]["max_epochs"]


def test_bf16_mixed_precision_run(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    cli = fit("mnist5k/kd.yaml", "--model.init_args.teacher", str(teacher), "--trainer.max_epochs=1",
              "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu")
    results = json.loads((Path(cli.results["run_dir"]) / "results.json").read_text())
    assert results["config"]["trainer"]["precision"] == "bf16-mixed"
    assert 0.0 < results["test_acc"] <= 1.0


@pytest.mark.parametrize("console", ["quiet", "default"])
def test_ddp_two_cpu_processes(tmp_path, console):
    """`distill fit ... --trainer.devices 2 --trainer.strategy ddp` through the console script, also with the default
    console: its progress bar reads the logged values on rank 0 only, which must not start a collective there."""
    teacher = write_teacher(tmp_path / "teacher.safetensors", model="mlp_1200_1200", in_channels=1, image_size=28)
    command = [str(DISTILL), "fit", "--config", str(CONFIGS / "mnist5k/kd.yaml"), *(QUIET if console == "quiet" else []),
               "--model.init_args.teacher", str(teacher), "--trainer.max_epochs=2", "--data.train_subset=640",
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_RUN_DIR", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist=True" not in result.stderr  # no advice to sync values that are reduced already
    runs = sorted(Path("runs/mnist5k/kd").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"]  # both processes logged into one run directory
    results = json.loads((runs[0] / "results.json").read_text())
    assert str(results["config"]["trainer"]["devices"]) == "2" and 0.0 < results["test_acc"] <= 1.0


def test_fast_dev_run_writes_into_its_own_version_directory_and_leaves_latest_alone(tmp_path):
    from distill.cli import main

    args = ["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.dataset", "fake",
            "--data.image_size", "8", "--data.in_channels", "1", "--data.fake_sizes", "[64, 32, 32]",
            "--trainer.enable_progress_bar", "false"]
    main([*args, "--trainer.fast_dev_run", "1"])
    run_dir = Path("runs/fake/supervised-mlp_30_30/version_0")
    assert (run_dir / "results.json").is_file() and (run_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in Path("runs").iterdir()) == ["fake"]  # nothing in the runs root itself
    assert not (run_dir.parent / "latest").exists()  # a smoke test is not the newest finished run
    main([*args, "--trainer.max_epochs", "1"])
    assert (run_dir.parent / "latest").resolve() == (run_dir.parent / "version_1").resolve()


def test_a_fit_prints_a_quiet_console_an_integer_v_num_and_the_test_table(tmp_path, caplog, capsys):
    import logging

    from distill.cli import main

    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.dataset", "fake",
                    "--data.image_size", "8", "--data.in_channels", "1", "--data.fake_sizes", "[64, 32, 32]",
                    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "GPU available" in logged  # Lightning's own lines still come through
    assert "💡 Tip" not in logged and "will override existing callbacks" not in logged
    assert [logger.version for logger in cli.trainer.loggers] == [0, 0]  # v_num=0, not "on_0"
    assert Path(cli.trainer.log_dir) == Path("runs/fake/supervised-mlp_30_30/version_0")
    out = capsys.readouterr().out
    assert "Test metric" in out and "test/acc" in out  # Lightning's table of the run's own test


def test_test_and_predict_write_into_the_run_they_evaluate_and_predict_saves_its_outputs(tmp_path):
    import csv

    from safetensors.torch import load_file

    from distill.cli import main

    fit = main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.dataset", "fake",
                "--data.image_size", "8", "--data.in_channels", "1", "--data.fake_sizes", "[64, 32, 48]",
                "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    run = Path(fit.trainer.log_dir)
    evaluate = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                "--trainer.enable_progress_bar", "false"]
    main(["test", *evaluate])
    main(["predict", *evaluate])
    main(["predict", *evaluate])
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoints", "predict_0", "predict_1", "test_0"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["latest", "version_0"]  # no new version for them
    assert "test/acc" in (run / "test_0" / "metrics.csv").read_text()
    with open(run / "predict_1" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    saved = load_file(str(run / "predict_1" / "probabilities.safetensors"))
    assert len(rows) == 48 and [int(r["index"]) for r in rows] == list(range(48))  # the test split, in order
    assert saved["probabilities"].shape == (48, 10)
    torch.testing.assert_close(saved["probabilities"].sum(dim=1), torch.ones(48))
    assert [int(r["predicted"]) for r in rows] == saved["probabilities"].argmax(dim=1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_under_ddp_with_the_default_console(method, tmp_path):
    """Two CPU processes, the progress bar on: every method logs the same collectives on every rank."""
    from distill.tools import killtest

    config = killtest.method_config(method, tmp_path, epochs=2, train_size=128)
    config["trainer"].update(enable_progress_bar=True, devices=2, strategy="ddp")
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_RUN_DIR", None)
    result = subprocess.run([str(DISTILL), "fit", "--config", str(path)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist=True" not in result.stderr
    (run,) = (tmp_path / "runs").glob("*/*/version_0")
    assert json.loads((run / "results.json").read_text())["config"]["trainer"]["devices"] in (2, "2")
