"""Global batch and learning-rate scaling (distill.callbacks) with 1 process, 2 CPU processes and SLURM."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from conftest import REPO
from distill.cli import main
from distill.errors import ConfigError
from distill.methods import Supervised
from distill.callbacks import GlobalBatch, LRScaling, global_batch, lr_factor, scale_learning_rates

SCRATCH = str(REPO / "configs" / "mnist5k" / "scratch.yaml")
DISTILL = Path(sys.executable).with_name("distill")
# mnist5k's scratch config (batch 64, SGD lr 0.05, cosine), cut to a few batches
SHORT = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0"]
LINEAR_64 = ["--trainer.callbacks+=distill.callbacks.LRScaling", "--trainer.callbacks.base_batch_size=64"]


def first_logged_lr(run_dir: Path) -> float:
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("lr")]
    return float(rows[0]["lr"])


def test_factor_and_global_batch_arithmetic():
    batch = GlobalBatch(per_process=64, world_size=8, accumulate=2)
    assert batch.size == 1024 and "64 per process × 8 processes × 2 accumulated" in str(batch)
    assert lr_factor("linear", 1024, 256) == 4.0
    assert lr_factor("none", 1024, 256) == 1.0
    with pytest.raises(ConfigError, match="linear"):
        lr_factor("sqrt", 1024, 256)
    with pytest.raises(ConfigError, match="rule"):
        LRScaling(rule="sqrt")
    with pytest.raises(ConfigError, match="base_batch_size"):
        LRScaling(base_batch_size=0)


def test_without_a_trainer_or_callback_nothing_changes():
    module = Supervised(student="mlp_30_30", num_classes=10, in_channels=1, image_size=28)
    optimizer = module.configure_optimizers()  # not attached to a Trainer: plain rates
    assert optimizer.param_groups[0]["lr"] == 0.05
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert scale_learning_rates(trainer, optimizer) is None and optimizer.param_groups[0]["lr"] == 0.05


def test_linear_scaling_one_process_through_the_cli(capsys):
    # global batch 64 × 1 process × 2 accumulated = 128 = 2 × base 64: the config's lr 0.05 becomes 0.1,
    # and the cosine schedule decays from 0.1 (the scheduler is built after the scaling).
    cli = main(["fit", "--config", SCRATCH, *SHORT, *LINEAR_64, "--trainer.accumulate_grad_batches=2"])
    out = capsys.readouterr().out
    assert "LRScaling: global batch 128 = 64 per process × 1 process × 2 accumulated; lr 0.05 → 0.1" in out
    run_dir = Path(cli.results["run_dir"])
    assert first_logged_lr(run_dir) == pytest.approx(0.1)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(0.1)]
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, LRScaling))
    assert callback.resolved["global_batch_size"] == 128 and callback.resolved["lr_factor"] == 2.0
    # the run's saved config repeats the scaling
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert any("LRScaling" in str(c) for c in config["trainer"]["callbacks"])


def test_rule_none_reports_but_keeps_the_rate(capsys):
    cli = main(["fit", "--config", SCRATCH, *SHORT, "--trainer.callbacks+=distill.callbacks.LRScaling",
                "--trainer.callbacks.rule=none"])
    assert "global batch 64 = 64 per process × 1 process × 1 accumulated; lr 0.05 → 0.05 (no scaling)" \
        in capsys.readouterr().out
    assert first_logged_lr(Path(cli.results["run_dir"])) == pytest.approx(0.05)


def test_ddp_two_cpu_processes_double_the_rate(tmp_path):
    """2 CPU processes via the console script: global batch 128, lr 0.05 × 128/64 = 0.1 on both ranks."""
    command = [str(DISTILL), "fit", "--config", SCRATCH, *SHORT, *LINEAR_64, "--trainer.accelerator=cpu",
               "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTILL_RUN_DIR", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # printed once (rank 0 only)
    assert result.stdout.count("LRScaling: global batch 128 = 64 per process × 2 processes × 1 accumulated; "
                               "lr 0.05 → 0.1") == 1, result.stdout[-3000:]
    runs = sorted(Path("runs/mnist5k/scratch").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"]
    assert first_logged_lr(runs[0]) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- SLURM, simulated
def slurm_env(monkeypatch, *, nodes: int, tasks_per_node: int, procid: int, job_name: str = "distill") -> None:
    """The variables `srun` sets in each task of `sbatch --nodes N --ntasks-per-node T` (no real launch)."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))]:
        monkeypatch.delenv(key)
    values = {
        "SLURM_NTASKS": nodes * tasks_per_node, "SLURM_NTASKS_PER_NODE": tasks_per_node, "SLURM_NNODES": nodes,
        "SLURM_PROCID": procid, "SLURM_LOCALID": procid % tasks_per_node, "SLURM_NODEID": procid // tasks_per_node,
        "SLURM_JOB_NAME": job_name, "SLURM_JOB_ID": 4242, "SLURM_NODELIST": f"gpu[01-{nodes:02d}]",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def test_simulated_slurm_job_is_detected_with_its_world_size(monkeypatch):
    # task 5 of `--nodes 2 --ntasks-per-node 4`: node 1, local rank 1
    slurm_env(monkeypatch, nodes=2, tasks_per_node=4, procid=5)
    trainer = L.Trainer(accelerator="cpu", devices=4, num_nodes=2, strategy="ddp", logger=False,
                        accumulate_grad_batches=2)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
    assert environment.main_address == "gpu01" and not trainer.is_global_zero
    batch = global_batch(trainer, per_process=64)
    assert batch.size == 64 * 8 * 2
    # lr 0.05 tuned at batch 64 → ×16 on this job
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    trainer.callbacks.append(LRScaling(base_batch_size=64))
    trainer.datamodule = SimpleNamespace(batch_size=64)  # what Trainer.fit attaches; only batch_size is read
    resolved = scale_learning_rates(trainer, optimizer)
    assert resolved["world_size"] == 8 and optimizer.param_groups[0]["lr"] == pytest.approx(0.8)


def test_slurm_tasks_must_match_devices_and_nodes(monkeypatch):
    # Lightning checks this when fit launches (SubprocessScriptLauncher.launch); call that check directly
    slurm_env(monkeypatch, nodes=2, tasks_per_node=4, procid=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="ntasks-per-node=4"):
        trainer.strategy.cluster_environment.validate_settings(num_devices=trainer.num_devices,
                                                               num_nodes=trainer.num_nodes)
    trainer = L.Trainer(accelerator="cpu", devices=4, num_nodes=1, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="nodes=2"):
        trainer.strategy.cluster_environment.validate_settings(num_devices=trainer.num_devices,
                                                               num_nodes=trainer.num_nodes)


def test_interactive_slurm_shell_is_not_a_slurm_launch(monkeypatch):
    # `srun --pty bash` / salloc shells: Lightning launches its own processes instead
    slurm_env(monkeypatch, nodes=1, tasks_per_node=1, procid=0, job_name="bash")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment)
    assert trainer.world_size == 2
