"""Teacher outputs computed once per training image and kept on disk: a method-agnostic cache.

A *fixed* teacher (Beyer et al. 2022's ``fix/*`` settings, or Hinton KD on data without augmentation)
gives every training image the same output in every epoch, so it need only run once. This module
stores those logits, one row per training-set index (the ``indices`` of every batch), and makes sure
a stored file is only ever used for exactly what it was computed from.

**Key.** A cache is valid for one :class:`CacheKey`: the teacher (sha256 of its file as recorded in
``DistillModule.teacher_info``, or of its tensors when it came from pretrained weights or is an
ensemble), the *view* (a string naming how the teacher saw each image, e.g.
``"central_crop(0.8)@128"``), and the data (:func:`data_fingerprint`: data set name, split, number of
examples and a sha256 of their labels and source positions). The file stores the key in its metadata.

**Location.** By default ``<cache_dir>/<dataset>-<split>-<key hash>.safetensors``: another teacher,
view or data set gives another file name, so caches of different runs never overwrite each other. A
file whose stored key differs from the expected one (stale), or which is truncated or holds the wrong
number of rows (partial), is rebuilt. A path pinned by the user (``path=``) is never overwritten
with something else: a stale pinned cache is a :class:`~distill.errors.ConfigError` naming what differs
(delete the file or choose another path); a missing pinned cache is built there.

**Writing** is atomic: a temporary file in the same directory, then a rename, so a crash never leaves a
half-written cache that looks complete.

**Distributed training.** :func:`load_or_build` is called by every process; the process with local
rank 0 on each node builds a missing cache (so node-local and shared file systems both work; on a
shared one two nodes write identical files and the renames race harmlessly), the others wait at a
barrier and then read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.errors import ConfigError

FORMAT = "distill-teacher-cache-v1"


@dataclass(frozen=True)
class CacheKey:
    """What a cached set of teacher outputs was computed from."""

    teacher: str  # sha256 of the teacher's weights (file or tensors)
    view: str  # how the teacher saw each image
    data: str  # data_fingerprint(...) as a canonical JSON string

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: CacheKey) -> list[str]:
        return [name for name in ("teacher", "view", "data") if getattr(self, name) != getattr(other, name)]


def data_fingerprint(dataset: str, split: str, labels: np.ndarray, source_indices: np.ndarray | None = None) -> str:
    """The identity of a split: name, split, size and a sha256 of its labels and source positions."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if source_indices is not None:
        digest.update(np.ascontiguousarray(source_indices, dtype=np.int64).tobytes())
    return json.dumps({"dataset": dataset, "split": split, "size": int(len(labels)),
                       "sha256": digest.hexdigest()}, sort_keys=True)


def tensors_sha256(module: nn.Module) -> str:
    """sha256 over a module's state_dict (names, shapes, dtypes and values), in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def teacher_fingerprint(teacher: nn.Module, info: Mapping[str, Any] | None) -> str:
    """The recorded file sha256 where the teacher came from one file, else a hash of its tensors."""
    if info and info.get("sha256") and not info.get("members"):
        return str(info["sha256"])
    return tensors_sha256(teacher)


def module_teacher_fingerprint(module: Any, teacher: nn.Module | None = None) -> str:
    """:func:`teacher_fingerprint` of a method's ``teacher`` (default: ``module.teacher``). Any other
    network that teaches (a staged method's assistant) has no recorded file hash: its tensors are hashed."""
    teacher = module.teacher if teacher is None else teacher
    return teacher_fingerprint(teacher, module.teacher_info if teacher is module.teacher else None)


def default_path(cache_dir: str | Path, key: CacheKey, dataset: str, split: str = "train") -> Path:
    return Path(cache_dir) / f"{dataset}-{split}-{key.digest()[:16]}.safetensors"


def read(path: Path, key: CacheKey, size: int) -> tuple[Tensor | None, str]:
    """``(logits, "ok")``, or ``(None, why)`` when the file is missing, unreadable, stale or partial."""
    if not path.is_file():
        return None, "missing"
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        return None, f"unreadable ({err})"
    if metadata.get("format") != FORMAT or "key" not in metadata:
        return None, "not a teacher cache"
    stored = CacheKey(**json.loads(metadata["key"]))
    if stored != key:
        return None, "stale: other " + " and ".join(stored.differences(key))
    logits = tensors.get("logits")
    if logits is None or logits.dim() != 2 or logits.shape[0] != size:
        return None, f"partial: {0 if logits is None else logits.shape[0]} of {size} rows"
    if "sha256" not in metadata:
        return None, "unchecked: no checksum of its contents (written by an earlier version)"
    if contents_sha256(logits) != metadata["sha256"]:
        return None, "damaged: its contents differ from the checksum written with them"
    bad_rows = int((~torch.isfinite(logits).all(dim=1)).sum())
    if bad_rows:
        return None, f"damaged: {bad_rows} rows are not finite"
    return logits, "ok"


def contents_sha256(logits: Tensor) -> str:
    """sha256 of the logits as stored (float32, row-major): a permuted, edited or partly overwritten file differs."""
    return hashlib.sha256(logits.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def write(path: Path, key: CacheKey, logits: Tensor) -> Path:
    """Writes the cache atomically (temporary file in the same directory, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    logits = logits.detach().float().cpu().contiguous()
    metadata = {"format": FORMAT, "key": json.dumps(asdict(key), sort_keys=True), "sha256": contents_sha256(logits)}
    save_file({"logits": logits}, str(tmp), metadata=metadata)
    give_default_mode(tmp)
    tmp.replace(path)
    return path


def give_default_mode(path: Path) -> None:
    """The permissions any new file of this process gets (``0o666`` less the umask): the safetensors writer creates
    its files ``0o600``, which left caches unreadable to the group a shared cache folder is meant for."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@torch.no_grad()
def compute(batches: Iterable[tuple[Tensor, Tensor, Tensor]], outputs: Callable[[Tensor], Tensor], size: int,
            device: torch.device | str = "cpu") -> Tensor:
    """Runs ``outputs(images)`` over ``(images, labels, indices)`` batches into a ``[size, classes]`` host tensor.

    The outputs are gathered where ``outputs`` computes them and copied to the host once, at the end: a copy per
    batch would make the device wait for the host before every batch (the every-view cache runs thousands).
    Every index in ``0..size-1`` must be seen exactly once; a gap is an error, not a silent zero row.
    """
    logits: Tensor | None = None
    seen: Tensor | None = None
    for images, _, indices in batches:
        out = outputs(images.to(device)).float()
        if logits is None:
            logits = torch.empty(size, out.shape[1], device=out.device)
            seen = torch.zeros(size, dtype=torch.bool, device=out.device)
        indices = indices.to(out.device, non_blocking=True)
        logits[indices] = out
        seen[indices] = True
    if logits is None or seen is None or not bool(seen.all()):  # both are made together, with the first batch
        missing = size if seen is None else int((~seen).sum())
        raise RuntimeError(f"teacher cache: {missing} of {size} images produced no output")
    return logits.cpu()


def load_or_build(
    key: CacheKey,
    size: int,
    build: Callable[[], Tensor],
    path: Path,
    pinned: bool = False,
    strategy: Any = None,
    local_rank: int = 0,
) -> tuple[Tensor, str]:
    """The cached logits for ``key`` (``[size, classes]``, CPU), building and writing them if needed.

    Returns ``(logits, status)`` with status ``"loaded"`` or ``"built (<reason>)"``. ``strategy`` is a
    Lightning strategy (for its ``barrier``) under distributed training, else ``None``.
    """
    logits, why = read(path, key, size)
    if logits is None and pinned and why.startswith(("stale", "not a teacher", "damaged", "unchecked")):
        raise ConfigError(
            f"teacher cache {path} cannot be used for this run ({why}); delete it (it is rebuilt), or set another "
            "teacher cache path (or none, for an automatic one)."
        )
    status = "loaded"
    if logits is None:
        if local_rank == 0:
            logits = build()
            if logits.shape[0] != size:
                raise RuntimeError(f"teacher cache: built {logits.shape[0]} rows for {size} images")
            write(path, key, logits)
        status = f"built ({why})"
    if strategy is not None:
        strategy.barrier("teacher_cache")
    if logits is None:  # another process on this node built it
        logits, why = read(path, key, size)
        if logits is None:
            raise RuntimeError(f"teacher cache {path} is not readable after it was built: {why}")
    return logits, status


def load_for_training_split(
    module: Any,
    view: Mapping[str, Any],
    outputs: Callable[[Tensor], Tensor],
    loader_view: str = "train",
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    build: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, str, Path]:
    """The cached teacher outputs of every training image of a method's fit, built if needed.

    ``module`` is a :class:`~distill.methods.DistillModule` attached to a Trainer with a
    :class:`~distill.data.DistillDataModule`; ``view`` describes how ``outputs`` (the teacher, on the
    images of ``data.eval_dataloader("train", view=loader_view)``) sees each image; the data module's
    geometry and normalisation are added to it. ``path`` pins the file (a stale one is an error);
    otherwise the file goes to ``cache_dir`` (default ``<trainer.default_root_dir>/teacher_cache``).
    ``build`` computes the rows itself instead (e.g. every augmented view of each image, one row per image).
    Returns ``(logits on CPU, status, path)``.
    """
    return load_for_split(module, "train", view, outputs, module_teacher_fingerprint(module), loader_view, path,
                          cache_dir, build)


def load_for_split(
    module: Any,
    split_name: str,
    view: Mapping[str, Any],
    outputs: Callable[[Tensor], Tensor],
    teacher: str,
    loader_view: str = "eval",
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    build: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, str, Path]:
    """As :func:`load_for_training_split`, for any split (``train``, ``val``, ``test``) and any teacher,
    named by its fingerprint ``teacher`` (:func:`module_teacher_fingerprint`)."""
    trainer = module.trainer
    data = getattr(trainer, "datamodule", None)
    if data is None or not hasattr(data, "eval_dataloader"):
        raise ConfigError(f"{type(module).__name__}'s teacher cache needs the DistillDataModule "
                          "(it reads the split in order).")
    split = data.eval_dataloader(split_name).dataset  # the split, its labels and source positions
    described = json.dumps({**view, "image_size": data.image_size,
                            "train_image_size": getattr(data, "train_image_size", None),
                            "mean": list(data.mean), "std": list(data.std)}, sort_keys=True)
    key = CacheKey(teacher=teacher, view=described,
                   data=data_fingerprint(data.hparams["dataset"], split_name, split.labels, split.source_indices))
    pinned = path is not None
    if path is None:
        folder = cache_dir or Path(trainer.default_root_dir) / "teacher_cache"
        path = default_path(folder, key, data.hparams["dataset"], split_name)
    path = Path(path)

    def in_order() -> Tensor:
        return compute(data.eval_dataloader(split_name, view=loader_view), outputs, len(split), module.device)

    logits, status = load_or_build(key, len(split), build or in_order, path, pinned=pinned, strategy=trainer.strategy,
                                   local_rank=trainer.local_rank)
    return logits, status, path


__all__ = ["CacheKey", "load_for_training_split", "load_for_split", "data_fingerprint", "tensors_sha256", "teacher_fingerprint", "module_teacher_fingerprint", "default_path", "read",
           "write", "compute", "load_or_build"]
