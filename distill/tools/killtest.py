"""Kill real ``distill fit`` runs and check that resuming them changes nothing.

    python -m distill.tools.killtest                       # every method, 4 interruptions each
    python -m distill.tools.killtest --methods BaselineKD --kills 2 --seed 1

For each method of the registry, :data:`distill.methods.METHODS` (a new method is tested with no edit
here; :func:`method_config` builds its config from its base classes): one uninterrupted run, then the
same config and seed interrupted ``--kills`` times and resumed with ``distill fit --resume RUN_DIR``
after each interruption, then run to the end. The interruptions cycle through: SIGTERM (pre-emption: a
mid-epoch ``last.ckpt``, exit status 0), SIGKILL while a checkpoint is being written (forced with
``DISTILL_CHECKPOINT_WRITE_DELAY``; the last good ``last.ckpt`` must still load and be unchanged) and
SIGKILL at a random, seeded moment. The staged methods (subclasses of
:class:`~distill.methods.StagedModule`: TeacherAssistantKD, ResidualKD) are also killed once in the
middle of their second stage. The final ``results.json`` metrics and the exported weights must equal the
uninterrupted run's. Exit status 0 when every method passes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from distill.methods import METHODS as REGISTRY
from distill.methods import DistillModule, StagedModule, TeacherStudentModule
from distill.run import data_arguments

#: the methods tested, in the registry's order
METHODS = tuple(REGISTRY)
#: methods trained in stages, each also killed once in the middle of its second stage
STAGED = tuple(name for name, cls in REGISTRY.items() if issubclass(cls, StagedModule))
KINDS = ("sigterm", "write", "random")
#: results.json entries that must not change when a run is interrupted and resumed
COMPARED = ("best_val_acc", "test_acc", "test", "epochs", "global_steps", "seed")


def _sgd(lr: float) -> dict[str, Any]:
    return {"class_path": "torch.optim.SGD", "init_args": {"lr": lr, "momentum": 0.9}}


#: Extra init_args per method: only what a method cannot run without on this tiny setting (a 30-30 MLP
#: student of a 300-300 MLP teacher on 8-pixel generated images, a few epochs). Everything else comes
#: from the method's base classes in :func:`method_config`, so most methods (DKD, say) need no entry.
EXTRA_INIT_ARGS: dict[str, dict[str, Any]] = {
    "TeacherAssistantKD": {"assistants": ["mlp_300_300"]},
    # S and A given (the 30-30 MLP cannot pay for derived connectors); feature matching between these
    # networks diverges at the default learning rate
    "ResidualKD": {"assistant": "mlp_30_30", "assistant_kwargs": {"width": 0.25}, "optimizer": _sgd(0.005)},
    # the teaching that runs the teacher on its own view in every step (named, though the default, so the
    # test keeps it); a warm-up that ends within the run's 256 steps (the default 1,500 would not, and the
    # resumed schedule's cosine part would go untested)
    "PatientConsistentKD": {"teaching": "function_matching", "warmup_steps": 4},
}


def brings_own_recipe(cls: type[DistillModule]) -> bool:
    """Whether a method overrides the default optimiser (PatientConsistentKD's AdamW with warm-up and
    cosine): its config then leaves the optimiser to the method instead of naming SGD."""
    return cls.default_optimizer is not DistillModule.default_optimizer


def method_config(method: str, workdir: Path, epochs: int, train_size: int = 512) -> dict[str, Any]:
    """A CPU-sized config on generated data, from the method's class in the registry: an MLP student,
    SGD unless the method brings its own recipe, a fixed random teacher file for a
    :class:`~distill.methods.TeacherStudentModule`, two equal stages for a
    :class:`~distill.methods.StagedModule`, and the method's :data:`EXTRA_INIT_ARGS`."""
    from distill.teachers import NetworkSpec, save_network
    import torch

    cls = REGISTRY[method]
    init_args: dict[str, Any] = {"student": "mlp_30_30"}
    if not brings_own_recipe(cls):
        init_args["optimizer"] = _sgd(0.05)
    if issubclass(cls, TeacherStudentModule):
        teacher = workdir / "teacher.safetensors"
        if not teacher.exists():
            torch.manual_seed(0)
            spec = NetworkSpec("mlp_300_300", 10, 1, 8)
            save_network(spec.build(), spec, teacher)
        init_args["teacher"] = str(teacher)
    if issubclass(cls, StagedModule):
        init_args["stage_epochs"] = [epochs // 2, epochs - epochs // 2]
    init_args.update(EXTRA_INIT_ARGS.get(method, {}))
    return {
        "seed_everything": 7,
        "trainer": {"max_epochs": epochs, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(workdir / "runs")},
        "data": {"dataset": "fake", "num_classes": 10, "in_channels": 1, "image_size": 8,
                 "fake_sizes": [train_size, 64, 64], "batch_size": 16, "augment": "none"},
        "model": {"class_path": f"distill.methods.{method}", "init_args": init_args},
    }


def _command() -> list[str]:
    return [sys.executable, "-m", "distill.cli", "fit"]


def _environment(**extra: str) -> dict[str, str]:
    from distill.run import child_environment

    return {**child_environment(), "OMP_NUM_THREADS": "1", **extra}


def _latest_run(parent: Path) -> Path | None:
    runs = sorted(parent.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1] if runs else None


def _compared(results: dict[str, Any]) -> dict[str, Any]:
    picked = {key: results.get(key) for key in COMPARED}
    if "stages" in results:
        picked["stages"] = [{k: s.get(k) for k in ("stage", "best_val_acc", "test_acc")} for s in results["stages"]]
    return picked


def _weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _interrupt(process: subprocess.Popen, kind: str, checkpoints: Path, rng: random.Random,
               epoch_seconds: float, log: list[str]) -> None:
    """Waits for the moment of ``kind`` and interrupts the process then (unless it finished first)."""
    last = checkpoints / "last.ckpt"
    before = last.stat().st_mtime_ns if last.exists() else None
    if kind == "write":  # the run sleeps between writing the temporary file and the rename
        while process.poll() is None and not any(checkpoints.glob(".*.ckpt.tmp-*")):
            time.sleep(0.02)
        good = last.read_bytes() if last.exists() else None
        process.send_signal(signal.SIGKILL)
        process.wait()
        if good is not None:  # the kill hit the write: the last good checkpoint is untouched and loads
            assert last.read_bytes() == good, "a killed checkpoint write changed last.ckpt"
            from distill.teachers import safe_torch_load
            safe_torch_load(last)
        log.append(f"SIGKILL during a checkpoint write (last.ckpt {'intact' if good else 'not yet written'})")
        return
    # wait for this segment's first new checkpoint (for "stage2", one in the second stage), then
    # a random moment within the next epoch
    while process.poll() is None:
        if last.exists() and last.stat().st_mtime_ns != before:
            before = last.stat().st_mtime_ns
            if kind != "stage2" or _stage(last) >= 1:
                break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, epoch_seconds))
    if process.poll() is not None:
        log.append(f"{kind}: the run finished before the interruption")
        return
    if kind == "sigterm":
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
        if code != 0 and (checkpoints.parent / "results.json").exists():
            log.append(f"{kind}: arrived after training had ended (exit {code}); the resume only tests")
            return
        assert code == 0, f"a pre-empted run exits with status 0, got {code}"
        log.append("SIGTERM (pre-emption): saved last.ckpt and exited 0")
    else:
        process.send_signal(signal.SIGKILL)
        process.wait()
        log.append("SIGKILL in the middle of stage 2" if kind == "stage2" else "SIGKILL at a random moment")


def _stage(path: Path) -> int:
    from distill.teachers import safe_torch_load

    try:
        checkpoint = safe_torch_load(path)
        return next(checkpoint[REGISTRY[name].STATE_KEY]["stage"] for name in STAGED
                    if REGISTRY[name].STATE_KEY in checkpoint)
    except Exception:  # being replaced right now: look again at the next checkpoint
        return -1


def reference_run(config: Path, method: str, workdir: Path, in_process: bool = False,
                  verbose: bool = True) -> dict[str, Any]:
    """The uninterrupted run: its results.json and exported weights."""
    args = ["--config", str(config), "--run_name", f"reference/{method}"]
    if in_process:
        from distill.cli import main as distill_main

        distill_main(["fit", *args])
    else:
        subprocess.run([*_command(), *args], check=True, env=_environment(), capture_output=not verbose)
    reference_dir = _latest_run(workdir / "runs" / "reference" / method)
    return {"results": json.loads((reference_dir / "results.json").read_text()), "weights": _weights(reference_dir)}


def check_method(method: str, workdir: Path, kills: int, seed: int, epochs: int = 8, train_size: int = 512,
                 in_process: bool = False, verbose: bool = True) -> list[str]:
    """Runs ``method`` uninterrupted and interrupted ``kills`` times; returns what happened.

    ``in_process``: the uninterrupted run and the final resume run in this process (``distill.cli.main``,
    saving two interpreter start-ups in the test suite); the interrupted runs are always subprocesses.

    Raises AssertionError when the resumed run's results differ from the uninterrupted run's.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{method}.yaml"
    config.write_text(yaml.safe_dump(method_config(method, workdir, epochs, train_size)))
    rng = random.Random(f"{seed}-{method}")
    reference = reference_run(config, method, workdir, in_process, verbose)
    # kill moments fall within the training time of one epoch (validation and testing excluded)
    train_images = data_arguments(reference["results"]["config"])["fake_sizes"][0]
    epoch_seconds = max(0.2, train_images / max(1.0, reference["results"]["train_images_per_s"] or 0.0))
    parent = workdir / "runs" / "killed" / method
    log: list[str] = []
    kinds = [KINDS[index % len(KINDS)] for index in range(kills)]
    if method in STAGED:
        kinds.append("stage2")
    for index, kind in enumerate(kinds):
        run_dir = _latest_run(parent)
        resumable = run_dir is not None and (run_dir / "checkpoints" / "last.ckpt").exists()
        args = ["--resume", str(run_dir)] if resumable else ["--config", str(config), "--run_name", f"killed/{method}"]
        extra = {"DISTILL_CHECKPOINT_WRITE_DELAY": "1.0"} if kind == "write" else {}
        process = subprocess.Popen([*_command(), *args], env=_environment(**extra),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a new run creates its directory; give it time to appear
        while not resumable and process.poll() is None and _latest_run(parent) in (None, run_dir):
            time.sleep(0.05)
        checkpoints = (run_dir if resumable else _latest_run(parent) or parent / "version_0") / "checkpoints"
        _interrupt(process, kind, checkpoints, rng, epoch_seconds, log)
        if verbose:
            print(f"[{method}] interruption {index + 1}: {log[-1]}", flush=True)
    run_dir = _latest_run(parent)
    final = ["--resume", str(run_dir)] if run_dir and (run_dir / "checkpoints" / "last.ckpt").exists() else \
        ["--config", str(config), "--run_name", f"killed/{method}"]
    if in_process:
        from distill.cli import main as distill_main

        distill_main(["fit", *final])
    else:
        subprocess.run([*_command(), *final], check=True, env=_environment(), capture_output=not verbose)
    run_dir = _latest_run(parent)
    results = json.loads((run_dir / "results.json").read_text())
    assert _compared(results) == _compared(reference["results"]), (
        f"{method}: resumed results differ:\n{_compared(results)}\nvs uninterrupted\n{_compared(reference['results'])}")
    import torch

    weights = _weights(run_dir)
    assert all(torch.equal(weights[k], v) for k, v in reference["weights"].items()), f"{method}: weights differ"
    log.append(f"results and weights equal the uninterrupted run's ({run_dir})")
    return log


#: Marks a directory as a killtest work directory, which a later run may empty.
WORKDIR_MARKER = ".distill-killtest"


def prepare_workdir(workdir: Path) -> None:
    """Empties ``workdir`` for a new harness run, or creates it.

    Only a directory that a killtest made (it holds :data:`WORKDIR_MARKER`) or an empty one is used: any
    other raises FileExistsError before anything is deleted. The directory itself is kept and only its
    contents are removed, so it may be the working directory of this process and its subprocesses.
    """
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / WORKDIR_MARKER).exists():
        raise FileExistsError(f"--workdir {workdir} holds files that no killtest wrote; the harness empties its "
                              "work directory first, so give it a new or empty directory")
    if workdir.is_dir():
        for entry in workdir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).touch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.tools.killtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--kills", type=int, default=4, help="interruptions per method (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("runs/killtest"),
                        help="emptied first: a new or empty directory, or an earlier killtest's (default runs/killtest)")
    args = parser.parse_args(argv)
    try:
        prepare_workdir(args.workdir)
    except FileExistsError as err:
        print(f"killtest: {err}", file=sys.stderr)
        return 2
    failed = []
    for method in args.methods:
        try:
            for line in check_method(method, args.workdir / method, args.kills, args.seed, args.epochs):
                print(f"[{method}] {line}")
        except AssertionError as err:
            failed.append(method)
            print(f"[{method}] FAILED: {err}", file=sys.stderr)
    print("killtest:", "all methods resumed exactly" if not failed else f"FAILED for {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
