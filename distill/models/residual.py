"""The predictor of ResidualKD (Gao et al., arXiv 2002.09168): a student S plus an assistant A.

Both read the image; their final feature maps are mapped into the teacher's feature space by
connectors where their shapes differ from the teacher's, added, and classified:

    logits = head(c_S(f_S) + c_A(f_A))          (S alone: head(c_S(f_S)))

A connector is a 1×1 convolution followed by a resize to the teacher's map size (a linear layer for
vector features such as an MLP's last hidden layer). ``head`` is global average pooling (for maps)
and one linear layer: the structure of the teacher's classifier for every zoo network, so a method can
copy the teacher's classifier into it (see :class:`~distill.methods.ResidualKD`).

The network is a zoo model (``residual_pair``) so that a trained pair is saved and loaded like any
other network (``distill.teachers.save_network``/``load_network``) and can teach another run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.models.base import ClassifierModel
from distill.models.registry import create_model, register_model

#: Input side used to find feature shapes when the data's image size is not known (conv nets only).
DEFAULT_PROBE_SIZE = 32


def feature_shape(model: ClassifierModel, in_channels: int, image_size: int | None) -> tuple[int, ...]:
    """Shape (without the batch) of ``model``'s final feature for one image of the given size."""
    if not getattr(model, "supports_features", True):
        raise ConfigError(
            f"{model.model_name or type(model).__name__} exposes no feature map (forward_features); "
            "ResidualKD distils feature maps: choose a network with stage features (see distill.models)."
        )
    size = image_size or DEFAULT_PROBE_SIZE
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device  # the meta device when only counting FLOPs
            feature = model.forward_features(torch.zeros(1, in_channels, size, size, device=device))[-1]
    finally:
        model.train(was_training)
    return tuple(int(d) for d in feature.shape[1:])


def describe_shape(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape)


class Connector(nn.Module):
    """A final feature mapped to the teacher's shape: 1×1 conv + resize (maps) or linear (vectors).

    ``zero_init`` starts it at zero, so an untrained assistant adds nothing to the student.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], zero_init: bool = False) -> None:
        super().__init__()
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if len(in_shape) != len(out_shape) or len(in_shape) not in (1, 3):
            raise ConfigError(
                f"cannot connect a feature of shape {describe_shape(in_shape)} to the teacher's "
                f"{describe_shape(out_shape)}: ResidualKD pairs two C×H×W maps or two vectors; choose "
                "networks whose final features are both maps (CNNs) or both vectors (MLPs)."
            )
        self.out_size = tuple(out_shape[1:])
        if len(in_shape) == 3:
            self.map = nn.Conv2d(in_shape[0], out_shape[0], kernel_size=1)
        else:
            self.map = nn.Linear(in_shape[0], out_shape[0])
        if zero_init:
            nn.init.zeros_(self.map.weight)
            nn.init.zeros_(self.map.bias)

    def forward(self, feature: Tensor) -> Tensor:
        out = self.map(feature)
        if out.dim() == 4 and tuple(out.shape[2:]) != self.out_size:
            larger = all(a >= b for a, b in zip(out.shape[2:], self.out_size))
            out = (F.adaptive_avg_pool2d(out, self.out_size) if larger
                   else F.interpolate(out, size=self.out_size, mode="bilinear", align_corners=False))
        return out


def connector(in_shape: Sequence[int], out_shape: Sequence[int], zero_init: bool = False) -> nn.Module:
    """The identity where the shapes already agree, a :class:`Connector` otherwise."""
    if tuple(in_shape) == tuple(out_shape):
        return nn.Identity()
    return Connector(in_shape, out_shape, zero_init)


class PooledLinear(nn.Module):
    """Global average pooling (for maps) and a linear layer: the classifier of the zoo's networks."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, feature: Tensor) -> Tensor:
        if feature.dim() == 4:
            feature = feature.mean(dim=(2, 3))
        return self.fc(feature)


class ResidualPair(ClassifierModel):
    """Student + assistant + connectors + classifier; ``forward`` is the S+A prediction.

    ``forward_features`` returns one feature, ``c_S(f_S) + c_A(f_A)`` (in the teacher's feature space),
    which is what the head classifies.
    """

    def __init__(self, student: ClassifierModel, assistant: ClassifierModel, target_shape: Sequence[int],
                 num_classes: int, in_channels: int, image_size: int | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.target_shape = tuple(int(d) for d in target_shape)
        self.student = student
        self.assistant = assistant
        self.student_shape = feature_shape(student, in_channels, image_size)
        self.assistant_shape = feature_shape(assistant, in_channels, image_size)
        self.student_connector = connector(self.student_shape, self.target_shape)
        self.assistant_connector = connector(self.assistant_shape, self.target_shape, zero_init=True)
        self.head = PooledLinear(self.target_shape[0], num_classes)
        self.feature_channels = [self.target_shape[0]]
        self.unused = self._unused_parameters(in_channels, image_size)
        self.freeze_unused()

    def _unused_parameters(self, in_channels: int, image_size: int | None) -> list[str]:
        """Names of parameters the prediction never uses: S's and A's own classifiers."""
        size = image_size or DEFAULT_PROBE_SIZE
        params = dict(self.named_parameters())
        flags = {name: p.requires_grad for name, p in params.items()}
        was_training = self.training
        self.eval().requires_grad_(True)
        try:
            with torch.enable_grad():
                probe = torch.zeros(1, in_channels, size, size, device=next(self.parameters()).device)
                grads = torch.autograd.grad(self(probe).sum(), list(params.values()), allow_unused=True)
        finally:
            self.train(was_training)
            for name, p in params.items():
                p.requires_grad_(flags[name])
        return [name for name, grad in zip(params, grads) if grad is None]

    def freeze_unused(self) -> None:
        """No gradients for parameters that the prediction does not use (DDP requires every trained
        parameter to receive one)."""
        for name in self.unused:
            self.get_parameter(name).requires_grad_(False)

    def used_parameters(self, *modules: nn.Module) -> int:
        """Number of parameters of ``modules`` (default: all) that the prediction uses."""
        unused = {id(self.get_parameter(name)) for name in self.unused}
        return sum(p.numel() for m in (modules or (self,)) for p in m.parameters() if id(p) not in unused)

    def student_feature(self, x: Tensor) -> Tensor:
        """``c_S(f_S)``: the student's final map in the teacher's feature space."""
        return self.student_connector(self.student.forward_features(x)[-1])

    def assistant_feature(self, x: Tensor) -> Tensor:
        """``c_A(f_A)``: the assistant's final map in the teacher's feature space."""
        return self.assistant_connector(self.assistant.forward_features(x)[-1])

    def forward_features(self, x: Tensor) -> list[Tensor]:
        return [self.student_feature(x) + self.assistant_feature(x)]

    def forward_head(self, feature: Tensor) -> Tensor:
        return self.head(feature)

    def student_logits(self, x: Tensor) -> Tensor:
        """The prediction of S alone (through the same connector and classifier)."""
        return self.head(self.student_feature(x))


@register_model
def residual_pair(
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    student: str = "resnet8",
    student_kwargs: dict[str, Any] | None = None,
    assistant: str = "resnet8",
    assistant_kwargs: dict[str, Any] | None = None,
    target_shape: Sequence[int] | None = None,
) -> ResidualPair:
    """ResidualKD's S+A predictor: two zoo networks by name and the teacher's final feature shape
    ``target_shape`` (``[C, H, W]`` or ``[D]``; default: the student's own, no student connector).
    The default pair is ``resnet8`` with a ``resnet8`` of a quarter width as assistant."""
    common = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    s = create_model(student, **common, **dict(student_kwargs or {}))
    a = create_model(assistant, **common, **dict({"width": 0.25} if assistant_kwargs is None else assistant_kwargs))
    if target_shape is None:
        target_shape = feature_shape(s, in_channels, image_size)
    return ResidualPair(s, a, target_shape, num_classes, in_channels, image_size)
