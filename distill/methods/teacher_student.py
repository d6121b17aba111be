"""A student taught by a frozen teacher (or an ensemble of them): what every distillation method shares."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from distill import teacher_cache
from distill.errors import CheckpointError, ConfigError
from distill.methods.base import DistillModule
from distill.teachers import load_network

# Lightning warns when modules are in eval mode as training starts; a frozen teacher always is.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

#: State-dict prefix of the teacher, which checkpoints never store (they record where it came from).
TEACHER_PREFIX = "teacher."


class TeacherEnsemble(nn.Module):
    """Several frozen teachers whose logits are averaged (Hinton et al.'s ensemble teacher; Beyer et al.'s)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: Tensor) -> Tensor:
        return torch.stack([member(images).float() for member in self.members]).mean(dim=0)


class TeacherStudentModule(DistillModule):
    """Base of the methods that distil from a teacher: loads it, freezes it for good (no gradients, eval
    mode, never optimised), runs it without autograd, and keeps its tensors out of checkpoints.

    Args:
        teacher: path of the teacher (a ``.ckpt`` from any method here, a ``.safetensors`` file, or a
            state_dict ``.pt``/``.pth``; loaded with ``weights_only=True``), or a list of such files: an
            ensemble whose logits are averaged.
        teacher_model: zoo name of the teacher's architecture (one, or one per file); needed for plain
            state_dicts and for ``teacher_pretrained`` (e.g. ``tv.resnet50``), read from the file otherwise.
        teacher_kwargs: constructor arguments of ``teacher_model``.
        teacher_pretrained: with no ``teacher`` file, use torchvision/timm pretrained weights.
        **kwargs: the student, data-linked sizes, optimiser and schedule: see :class:`DistillModule`.
    """

    def __init__(self, *, teacher: str | list[str | None] | None = None, teacher_model: str | list[str] | None = None,
                 teacher_kwargs: dict[str, Any] | None = None, teacher_pretrained: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hp = self.hparams
        files = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        models = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model] * len(files)
        if len(models) != len(files) or not files:
            raise ConfigError(f"teacher lists {len(files)} files but teacher_model {len(models)} names; "
                              "give one teacher_model, or one per teacher.")
        loaded = [load_network(path, model, num_classes=hp.num_classes, in_channels=hp.in_channels,
                               image_size=hp.image_size, model_kwargs=teacher_kwargs, pretrained=teacher_pretrained)
                  for path, model in zip(files, models)]
        if isinstance(teacher, (list, tuple)):
            members = [member.describe() for member in loaded]
            fingerprints = [m["sha256"] or teacher_cache.tensors_sha256(n.network) for m, n in zip(members, loaded)]
            network: nn.Module = TeacherEnsemble([member.network for member in loaded])
            self.teacher_info: dict[str, Any] = {"path": [m["path"] for m in members], "members": members,
                                                 "sha256": hashlib.sha256("".join(fingerprints).encode()).hexdigest()}
        else:
            network, self.teacher_info = loaded[0].network, loaded[0].describe()
        self.teacher = network.eval().requires_grad_(False)

    def active_teacher(self) -> nn.Module | None:
        return self.teacher

    def train(self, mode: bool = True) -> "TeacherStudentModule":
        # Lightning switches the whole module to train mode each epoch; the teacher must keep using
        # its BatchNorm running statistics and no dropout.
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()
        return self

    def teacher_logits(self, images: Tensor) -> Tensor:
        """The active teacher's logits under ``torch.inference_mode`` (no autograd graph, no version counting).

        The result is cloned outside inference mode: an inference tensor may not be saved for the student's
        backward pass, which a loss is free to do with the teacher's logits; the clone of a ``B × classes``
        tensor costs next to nothing. Runs under the step's autocast (bf16 with ``precision: bf16-mixed``).
        """
        teacher = self.active_teacher()
        assert teacher is not None
        with torch.inference_mode():
            logits = teacher(images)
        return logits.clone() if logits.is_inference() else logits

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is an input, not a result: checkpoints record where it came from, not its tensors.
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        checkpoint["teacher"] = dict(self.teacher_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        recorded, current = checkpoint.get("teacher") or {}, self.teacher_info or {}
        if recorded.get("sha256") and current.get("sha256") and recorded["sha256"] != current["sha256"]:
            raise CheckpointError(
                f"the checkpoint was trained with teacher {recorded.get('path')} (sha256 "
                f"{recorded['sha256'][:12]}…) but the configured teacher {current.get('path')} differs "
                f"(sha256 {current['sha256'][:12]}…); resume with the original teacher file.")
        # Put the (unchanged) teacher back so that Lightning's strict state_dict loading succeeds.
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(TEACHER_PREFIX + key, value)


__all__ = ["TeacherStudentModule", "TeacherEnsemble", "TEACHER_PREFIX"]
