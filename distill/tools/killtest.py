"""Kill real ``distill fit`` runs and check that resuming them changes nothing.

    python -m distill.tools.killtest                       # every method and setting, 4 interruptions each
    python -m distill.tools.killtest --methods BaselineKD --settings images ddp --kills 2 --seed 1

For each method of the registry, :data:`distill.methods.METHODS` (a new method is tested with no edit
here; :func:`method_config` builds its config from its base classes), and each setting of
:data:`SETTINGS`: one uninterrupted run, then the same config and seed interrupted and continued after
each interruption as a user would (``distill fit --resume RUN_DIR``, or the command the refusal names),
then run to the end. The final ``results.json`` metrics and the exported weights must equal the
uninterrupted run's. Exit status 0 when every method passes in every setting.

The interruptions: first a SIGKILL before the run's first checkpoint (the resume is refused with the
command that starts the run again, which the harness then runs); then ``--kills`` of, in turn, SIGTERM
(pre-emption: a mid-epoch ``last.ckpt``, exit status 0), SIGKILL while a checkpoint is being written
(forced with ``DISTILL_CHECKPOINT_WRITE_DELAY``; the last good ``last.ckpt`` must still load and be
unchanged), SIGKILL at a random, seeded moment, and SIGKILL followed by damage to ``last.ckpt`` (cut to
half its size: the resume falls back to the newest intact checkpoint and must still end where an
uninterrupted run ends). The staged methods (subclasses of :class:`~distill.methods.StagedModule`:
TeacherAssistantKD, ResidualKD) are also killed once in the middle of their second stage. Signals go to
the run's whole process group, as a scheduler sends them: DataLoader workers and DDP processes included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from distill.run import child_environment, dir_number, has_checkpoint

#: the methods tested, in the registry's order
METHODS = tuple(REGISTRY)
#: methods trained in stages, each also killed once in the middle of its second stage
STAGED = tuple(name for name, cls in REGISTRY.items() if issubclass(cls, StagedModule))
KINDS = ("sigterm", "write", "random", "damaged")
#: the settings a method is killed in, each on top of the basic one
SETTINGS = {
    "basic": "generated 8-px images held in memory, no augmentation, one process",
    "images": "PNG files of an image folder read by 2 DataLoader workers, random crop + flip (augment: cifar, "
              "except for methods that augment on the device), a student with dropout",
    "cache": "the teacher's outputs computed once into a cache file and looked up (the methods that can: "
             "BaselineKD's and TeacherAssistantKD's cache_teacher_outputs, PatientConsistentKD's fixed teaching)",
    "ddp": "two CPU processes (DDP over gloo)",
}
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


def takes(cls: type[DistillModule], argument: str) -> bool:
    """Whether the method's constructor (or one of its base classes') has ``argument``."""
    import inspect

    return any(argument in inspect.signature(base.__init__).parameters for base in cls.__mro__
               if "__init__" in base.__dict__)


def applies(method: str, setting: str) -> bool:
    """Whether ``setting`` means something for ``method``: the cache setting needs a method that caches."""
    cls = REGISTRY[method]
    if setting == "cache":
        return takes(cls, "cache_teacher_outputs") or takes(cls, "teaching")
    return setting in SETTINGS


def write_image_folder(root: Path, classes: int = 10, train: int = 48, test: int = 8, size: int = 8) -> Path:
    """A small learnable data set of PNG files (``train/<class>/``, ``test/<class>/``): each class a colour
    gradient of its own, every image with its own noise. Written once per work directory."""
    import numpy as np
    from PIL import Image

    if (root / "test").is_dir():
        return root
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for split, count in (("train", train), ("test", test)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            colour = np.array([(37 * label) % 256, (91 * label + 60) % 256, 255 - 23 * label])
            for k in range(count):
                pixels = colour * (0.4 + 0.6 * ramp) + rng.normal(0, 24, (size, size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{k:03d}.png")
    return root


def method_config(method: str, workdir: Path, epochs: int, train_size: int = 512,
                  setting: str = "basic") -> dict[str, Any]:
    """A CPU-sized config, from the method's class in the registry: an MLP student, SGD unless the method
    brings its own recipe, a fixed random teacher file for a :class:`~distill.methods.TeacherStudentModule`,
    two equal stages for a :class:`~distill.methods.StagedModule`, the method's :data:`EXTRA_INIT_ARGS`,
    and what ``setting`` (:data:`SETTINGS`) adds: generated data of ``train_size`` training images in the
    basic setting."""
    from distill.teachers import NetworkSpec, save_network
    import torch

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    cls = REGISTRY[method]
    in_channels = 3 if setting == "images" else 1
    init_args: dict[str, Any] = {"student": "mlp_30_30"}
    if not brings_own_recipe(cls):
        init_args["optimizer"] = _sgd(0.05)
    if issubclass(cls, TeacherStudentModule):
        teacher = workdir / f"teacher-{in_channels}x8.safetensors"
        if not teacher.exists():
            torch.manual_seed(0)
            spec = NetworkSpec("mlp_300_300", 10, in_channels, 8)
            save_network(spec.build(), spec, teacher)
        init_args["teacher"] = str(teacher)
    if issubclass(cls, StagedModule):
        init_args["stage_epochs"] = [epochs // 2, epochs - epochs // 2]
    init_args.update(EXTRA_INIT_ARGS.get(method, {}))
    trainer = {"max_epochs": epochs, "accelerator": "cpu", "enable_progress_bar": False,
               "enable_model_summary": False, "default_root_dir": str(workdir / "runs")}
    data: dict[str, Any] = {"dataset": "fake", "num_classes": 10, "in_channels": 1, "image_size": 8,
                            "fake_sizes": [train_size, 64, 64], "batch_size": 16, "augment": "none"}
    if setting == "images":
        data = {"dataset": "imagefolder", "data_dir": str(write_image_folder(workdir / "images")),
                "val_fraction": 0.125, "batch_size": 16, "num_workers": 2,
                "augment": "none" if cls.augments_on_device else "cifar"}
        init_args["student_kwargs"] = {"dropout": 0.2}
    elif setting == "cache":
        if takes(cls, "cache_teacher_outputs"):
            init_args["cache_teacher_outputs"] = True
        elif takes(cls, "teaching"):
            init_args["teaching"] = "fixed"
    elif setting == "ddp":
        trainer.update(devices=2, strategy="ddp")
    return {"seed_everything": 7, "trainer": trainer, "data": data,
            "model": {"class_path": f"distill.methods.{method}", "init_args": init_args}}


def _command() -> list[str]:
    return [sys.executable, "-m", "distill.cli", "fit"]


def _environment(**extra: str) -> dict[str, str]:
    return {**child_environment(), "OMP_NUM_THREADS": "1", **extra}


def _latest_run(parent: Path) -> Path | None:
    return max((p for p in parent.glob("version_*") if dir_number(p) is not None), key=dir_number, default=None)


def _compared(results: dict[str, Any]) -> dict[str, Any]:
    picked = {key: results.get(key) for key in COMPARED}
    if "stages" in results:
        picked["stages"] = [{k: s.get(k) for k in ("stage", "best_val_acc", "test_acc")} for s in results["stages"]]
    return picked


def _weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _signal(process: subprocess.Popen, signum: int) -> None:
    """``signum`` to the run's whole process group (it was started in a session of its own), as a scheduler
    signals a job: the DataLoader workers and DDP processes get it too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _kill(process: subprocess.Popen) -> None:
    _signal(process, signal.SIGKILL)
    process.wait()


def _interrupt(process: subprocess.Popen, kind: str, checkpoints: Path, rng: random.Random,
               epoch_seconds: float, log: list[str]) -> None:
    """Waits for the moment of ``kind`` and interrupts the process then (unless it finished first)."""
    last = checkpoints / "last.ckpt"
    before = last.stat().st_mtime_ns if last.exists() else None
    if kind == "early":  # as soon as the run has a directory with its config, before it writes a checkpoint
        while process.poll() is None and not (checkpoints.parent / "config.yaml").exists():
            time.sleep(0.01)
        _kill(process)
        written = has_checkpoint(checkpoints.parent)
        log.append(f"SIGKILL before the first checkpoint{' (too late: one was written)' if written else ''}")
        return
    if kind == "write":  # the run sleeps between writing the temporary file and the rename
        while process.poll() is None and not any(checkpoints.glob(".*.ckpt.tmp-*")):
            time.sleep(0.02)
        good = last.read_bytes() if last.exists() else None
        _kill(process)
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
        _signal(process, signal.SIGTERM)
        code = process.wait(timeout=300)
        if code != 0 and (checkpoints.parent / "results.json").exists():
            log.append(f"{kind}: arrived after training had ended (exit {code}); the resume only tests")
            return
        assert code == 0, f"a pre-empted run exits with status 0, got {code}"
        log.append("SIGTERM (pre-emption): saved last.ckpt and exited 0")
        return
    _kill(process)
    if kind == "damaged":
        others = [p for p in checkpoints.glob("*.ckpt") if p.name != last.name]
        if last.exists() and others:
            last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
            log.append("SIGKILL, then last.ckpt cut to half its size")
        else:
            log.append("SIGKILL at a random moment (no other checkpoint to fall back to: last.ckpt left whole)")
        return
    log.append("SIGKILL in the middle of stage 2" if kind == "stage2" else "SIGKILL at a random moment")


def _stage(path: Path) -> int:
    from distill.teachers import safe_torch_load

    try:
        checkpoint = safe_torch_load(path)
        return next(checkpoint[REGISTRY[name].STATE_KEY]["stage"] for name in STAGED
                    if REGISTRY[name].STATE_KEY in checkpoint)
    except Exception:  # being replaced right now: look again at the next checkpoint
        return -1


def _fit(args: list[str], in_process: bool, verbose: bool) -> None:
    if in_process:
        from distill.cli import main as distill_main

        distill_main(["fit", *args])
    else:
        subprocess.run([*_command(), *args], check=True, env=_environment(), capture_output=not verbose)


def reference_run(config: Path, method: str, workdir: Path, in_process: bool = False,
                  verbose: bool = True) -> dict[str, Any]:
    """The uninterrupted run: its results.json and exported weights."""
    _fit(["--config", str(config), "--run_name", f"reference/{method}"], in_process, verbose)
    reference_dir = _latest_run(workdir / "runs" / "reference" / method)
    return {"results": json.loads((reference_dir / "results.json").read_text()), "weights": _weights(reference_dir)}


#: how ``distill fit --resume`` refuses a run that has no checkpoint, followed by the command to run instead
START_AGAIN = "start it again with: distill fit "
#: how it refuses a run killed before it saved its config
RUN_AGAIN = "run the command that started it again"


def continue_arguments(run_dir: Path | None, config: Path, method: str) -> list[str]:
    """What a user runs after an interruption: ``--resume RUN_DIR``; for a run killed before its first checkpoint,
    the command that the refused resume names (asserting that it is refused that way)."""
    if run_dir is None:
        return ["--config", str(config), "--run_name", f"killed/{method}"]
    if has_checkpoint(run_dir):
        return ["--resume", str(run_dir)]
    refused = subprocess.run([*_command(), "--resume", str(run_dir)], capture_output=True, text=True,
                             env=_environment())
    if refused.returncode == 2 and RUN_AGAIN in refused.stderr:  # killed before it saved its config
        return ["--config", str(config), "--run_name", f"killed/{method}"]
    assert refused.returncode == 2 and START_AGAIN in refused.stderr, (
        f"a resume of a run without a checkpoint should be refused with the command to start it again; "
        f"got exit {refused.returncode}: {refused.stderr[-500:]}")
    return refused.stderr.split(START_AGAIN)[-1].split()


def check_method(method: str, workdir: Path, kills: int, seed: int, epochs: int = 8, train_size: int = 512,
                 in_process: bool = False, verbose: bool = True, setting: str = "basic",
                 early: bool = True) -> list[str]:
    """Runs ``method`` in ``setting`` uninterrupted, then interrupted (``early``: once before its first checkpoint;
    then ``kills`` times) and continued each time; returns what happened.

    ``in_process``: the uninterrupted run and the final resume run in this process (``distill.cli.main``,
    saving two interpreter start-ups in the test suite; not under DDP, whose second process re-runs the
    command line); the interrupted runs are always subprocesses.

    Raises AssertionError when the resumed run's results differ from the uninterrupted run's.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{method}.yaml"
    settings = method_config(method, workdir, epochs, train_size, setting)
    config.write_text(yaml.safe_dump(settings))
    in_process = in_process and setting != "ddp"
    rng = random.Random(f"{seed}-{method}" if setting == "basic" else f"{seed}-{method}-{setting}")
    reference = reference_run(config, method, workdir, in_process, verbose)
    # kill moments fall within the training time of one epoch (validation and testing excluded)
    results = reference["results"]
    processes = int(settings["trainer"].get("devices", 1))
    train_images = results["global_steps"] / results["epochs"] * settings["data"]["batch_size"] * processes
    epoch_seconds = max(0.2, train_images / max(1.0, results["train_images_per_s"] or 0.0))
    parent = workdir / "runs" / "killed" / method
    log: list[str] = []
    kinds = (["early"] if early else []) + [KINDS[index % len(KINDS)] for index in range(kills)]
    if method in STAGED:
        kinds.append("stage2")
    for index, kind in enumerate(kinds):
        run_dir = _latest_run(parent)
        args = continue_arguments(run_dir, config, method)
        resumed = args[0] == "--resume"
        extra = {"DISTILL_CHECKPOINT_WRITE_DELAY": "1.0"} if kind == "write" else {}
        output = workdir / f"interruption-{index + 1}.log"  # what the run printed, kept for a failure's message
        with output.open("w") as sink:
            process = subprocess.Popen([*_command(), *args], env=_environment(**extra), start_new_session=True,
                                       stdout=sink, stderr=subprocess.STDOUT)
        # a new run creates its directory; give it time to appear
        while not resumed and process.poll() is None and _latest_run(parent) in (None, run_dir):
            time.sleep(0.01)
        checkpoints = (run_dir if resumed else _latest_run(parent) or parent / "version_0") / "checkpoints"
        try:
            _interrupt(process, kind, checkpoints, rng, epoch_seconds, log)
        except AssertionError as failure:
            raise AssertionError(f"{failure}; the run printed:\n{_tail(output)}") from None
        finally:
            if process.poll() is None:
                _kill(process)
        # killed (-9), pre-empted or finished (0), or stopped by SIGTERM before training (143); anything else
        # is a run that failed on its own
        assert process.returncode in (0, -signal.SIGKILL, 128 + signal.SIGTERM), (
            f"{method} ({setting}): `distill fit {' '.join(args)}` failed by itself (exit {process.returncode}):\n"
            f"{_tail(output)}")
        if verbose:
            print(f"[{method}/{setting}] interruption {index + 1}: {log[-1]}", flush=True)
    _fit(continue_arguments(_latest_run(parent), config, method), in_process, verbose)
    run_dir = _latest_run(parent)
    results = json.loads((run_dir / "results.json").read_text())
    assert _compared(results) == _compared(reference["results"]), (
        f"{method} ({setting}): resumed results differ:\n{_compared(results)}\nvs uninterrupted\n"
        f"{_compared(reference['results'])}")
    import torch

    weights = _weights(run_dir)
    assert all(torch.equal(weights[k], v) for k, v in reference["weights"].items()), \
        f"{method} ({setting}): weights differ"
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
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS,
                        help="what the runs are killed in (default: all): " +
                             "; ".join(f"{name}: {what}" for name, what in SETTINGS.items()))
    parser.add_argument("--kills", type=int, default=4, help="interruptions per method after the early one (default 4)")
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
    for setting in args.settings:
        for method in (m for m in args.methods if applies(m, setting)):
            try:
                for line in check_method(method, args.workdir / setting / method, args.kills, args.seed, args.epochs,
                                         setting=setting):
                    print(f"[{method}/{setting}] {line}")
            except AssertionError as err:
                failed.append(f"{method}/{setting}")
                print(f"[{method}/{setting}] FAILED: {err}", file=sys.stderr)
    print("killtest:", "every method resumed exactly in every setting" if not failed
          else f"FAILED for {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
