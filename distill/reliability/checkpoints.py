"""A CheckpointIO that never leaves a half-written checkpoint and never unpickles code."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distill.teachers import safe_torch_load

#: Seconds to pause after writing the temporary file and before the rename: a test hook that lets
#: the kill test kill a run deterministically while a checkpoint is being written.
CHECKPOINT_WRITE_DELAY_ENV = "DISTILL_CHECKPOINT_WRITE_DELAY"
TMP_MARKER = ".tmp-"


def temporary_path(path: Path) -> Path:
    """Same directory (so the rename is atomic), a name no checkpoint glob (``*.ckpt``) matches."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def write_atomic(checkpoint: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    for stale in path.parent.glob(f".{path.name}{TMP_MARKER}*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        delay = float(os.environ.get(CHECKPOINT_WRITE_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself must survive a power cut too: sync the directory entry
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with an atomic save (temporary file, flush, fsync, rename) and a
    safe load (``torch.load(weights_only=True)``; a file that would execute pickled code is a
    :class:`~distill.errors.CheckpointError` naming the file).

    Lightning's own ``_atomic_save`` serialises to memory and then writes the destination in place,
    so a kill during that write leaves a truncated file where the last good checkpoint was.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        write_atomic(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(Path(path), map_location=map_location)


def relocated(value: Any, source: Path, target: Path) -> Any:
    """``value`` (a checkpoint, or any part) with every path string under ``source`` moved under ``target``."""
    if isinstance(value, dict):
        return {relocated(k, source, target): relocated(v, source, target) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(relocated(v, source, target) for v in value)
    if isinstance(value, str):
        for prefix in dict.fromkeys((str(source), str(source.resolve()))):
            if value == prefix or value.startswith(prefix + os.sep):
                return str(target) + value[len(prefix):]
    return value


def fork_run(source: Path, target: Path, leave_out: tuple[str, ...]) -> None:
    """Copies a finished run's directory into ``target`` (an empty new version) but for ``leave_out`` (its results
    and exports), and moves the paths its checkpoints hold (the checkpoint callback's best and last files, stage
    exports) to ``target``: resuming from there continues the run exactly, and the source is never written."""
    for item in source.iterdir():
        if item.name in leave_out or item.name.startswith((".", "test_", "validate_", "predict_")):
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)
    for checkpoint in (target / "checkpoints").glob("*.ckpt"):
        write_atomic(relocated(safe_torch_load(checkpoint), source, target), checkpoint)

