"""A method's ``cache_teacher_outputs``: the active teacher's logits on the training split, computed once and looked
up by the training steps instead of running the teacher (BaselineKD; TeacherAssistantKD, for each stage's teacher).

* ``data.augment: none``: one row per image, looked up by the batch's indices.
* **Every view** (``data.device_resident: true`` with ``augment: cifar`` or ``jitter``): these augmentations have
  a finite set of views per image (:class:`distill.data.resident.BatchAugment`; ``cifar`` at 32 px: 9 × 9 crop
  offsets × 2 flips = 162), so the teacher's logits for every view of every image are computed once, one row of
  ``views × classes`` per image, and looked up by ``(index, view)``: exactly the online teacher's targets.
* Anything else (a random augmentation on the DataLoader path) is a start-up error: the teacher's input changes
  every epoch and its views are not enumerated.

The outputs are computed under the run's precision (its autocast), as in the training step, and stored by
:mod:`distill.teacher_cache` (keyed by the teacher's weights, the view, the precision unless fp32, and the data;
shared by every run with the same teacher and data).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from distill import teacher_cache
from distill.data.resident import RESIDENT_PRESETS, BatchAugment, DeviceResidentLoader
from distill.errors import ConfigError
from distill.methods.base import TrainingBatch

#: Augmentations with a finite set of views per image, whose teacher outputs can all be cached (resident data).
VIEW_PRESETS = tuple(preset for preset in RESIDENT_PRESETS if preset != "none")
#: Pixels per batch of the every-view cache's teacher passes (a one-off, launch-bound at training batch sizes).
VIEW_CACHE_PIXELS = 1024 * 32 * 32


def check_cacheable(augment: str, device_resident: bool) -> None:
    """One clear error, before any work, for training data whose teacher outputs cannot be cached."""
    if augment != "none" and not (device_resident and augment in VIEW_PRESETS):
        raise ConfigError(
            f"cache_teacher_outputs stores the teacher's outputs per training image, but data.augment is "
            f"{augment!r} on the DataLoader path, so the teacher's input changes every epoch; cache every view "
            f"with data.device_resident: true (augment {' or '.join(VIEW_PRESETS)}), or set data.augment: none, "
            "or cache_teacher_outputs: false."
        )


def request_views(module: Any) -> None:
    """Asks the DataModule for each training image's view number when the loaders augment (in ``setup``)."""
    if module.training_augment() != "none":
        module.trainer.datamodule.training_views = True


def load_training_outputs(module: Any, name: str, path: str | None = None, cache_dir: str | None = None) -> Tensor:
    """The active teacher's cached logits on the training split, built if needed, on the module's device:
    ``[images, classes]``, or ``[images, views, classes]`` on augmented resident data. ``name`` labels the line
    printed on global rank 0."""
    trainer, data = module.trainer, module.trainer.datamodule
    teacher = module.active_teacher()

    def outputs(images: Tensor) -> Tensor:  # as the training step computes them: under its autocast
        with trainer.precision_plugin.forward_context():
            return module.teacher_logits(images)

    view: dict[str, Any] = {"view": "training split as loaded (augment none)"}
    build: Callable[[], Tensor] | None = None
    if module.training_augment() != "none":
        # views × images teacher passes: in large batches (1,024 images of 32 × 32 px, fewer of larger ones)
        batch = max(data.eval_batch_size, VIEW_CACHE_PIXELS // (data.image_size * data.image_size))
        loader = data.resident_loader("train", batch, shuffle=False, device=module.device)
        augment = BatchAugment(data.augment, loader.images.shape[-1])
        view = {"view": f"every view of augment {augment.preset} (pad {augment.padding}, crop, "
                        f"{'flip' if augment.flip else 'no flip'})", "views": augment.views}
        build = partial(every_view, loader, augment, outputs, module.device)

    if str(trainer.precision) not in ("32-true", "32"):
        view["precision"] = str(trainer.precision)
    logits, status, where = teacher_cache.load_for_split(
        module, "train", view, outputs, teacher_cache.module_teacher_fingerprint(module, teacher), "train",
        path, cache_dir, build)
    if build is not None:
        logits = logits.view(len(logits), view["views"], -1)
    if trainer.is_global_zero:
        views = f" × {view['views']} views" if build is not None else ""
        print(f"{name}: teacher cache {where} {status} ({len(logits)} images{views})")
    return logits.to(module.device)


def every_view(loader: DeviceResidentLoader, augment: BatchAugment, outputs: Any, device: torch.device) -> Tensor:
    """``outputs`` of every image in every view of ``augment``: ``[images, views × classes]``."""
    views = [teacher_cache.compute(loader.in_view(augment, view), outputs, len(loader.labels), device)
             for view in range(augment.views)]
    return torch.stack(views, dim=1).flatten(1)


class CachesTeacherOutputs:
    """Mixed into a method with a ``cache_teacher_outputs`` argument (before its LightningModule base): refuses
    training data whose teacher outputs cannot be cached before any work, and asks the DataModule for view numbers
    when the loaders augment. The method loads the cache itself (:func:`load_training_outputs`), when its teacher
    is known, and looks it up with :func:`look_up`."""

    def check_training_data(self, augment: str, device_resident: bool = False) -> None:
        super().check_training_data(augment, device_resident)  # type: ignore[misc]
        if self.hparams.cache_teacher_outputs:  # type: ignore[attr-defined]
            check_cacheable(augment, device_resident)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        if stage == "fit" and self.hparams.cache_teacher_outputs:  # type: ignore[attr-defined]
            request_views(self)


def look_up(cached: Tensor, batch: TrainingBatch) -> Tensor:
    """The cached logits of a training batch: by index, and by view when the loader augments."""
    indices = batch.indices.to(cached.device)
    if cached.dim() == 3:
        return cached[indices, batch.views.to(cached.device)]
    return cached[indices]


__all__ = ["CachesTeacherOutputs", "check_cacheable", "request_views", "load_training_outputs", "look_up", "every_view", "VIEW_PRESETS",
           "VIEW_CACHE_PIXELS"]
