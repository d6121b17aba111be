"""Fully connected ReLU networks, as in Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network" (2015), Sec. 3 (MNIST).

The paper's teacher has two hidden layers of 1200 ReLUs trained with dropout; the distilled students
have two layers of 800 (and, in smaller experiments, 300 or 30) units without regularisation. The
teacher's dropout rates are not given in the paper; ``mlp_1200_1200`` uses the rates of the dropout
paper it cites (Srivastava et al., JMLR 2014): 0.2 on the input, 0.5 on the hidden units. The paper's
max-norm weight constraint and input jitter are training choices, not part of the architecture, and
are not built in here.

The input ``[B, C, H, W]`` is flattened, so the first layer's size depends on the image size:
``image_size`` is required.

Features: the activations of each hidden layer (``[B, width]`` tensors, after ReLU and before
dropout); the head is dropout (rate ``dropout``) followed by the last linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.errors import ConfigError
from distill.models.base import ClassifierModel
from distill.models.registry import register_model, scale_widths


class MLP(ClassifierModel):
    """``[dropout]-Linear-ReLU`` hidden layers followed by ``[dropout]-Linear``.

    Args:
        in_features: ``in_channels * height * width`` of the input.
        num_classes: size of the logits.
        hidden: widths of the hidden layers; empty gives multinomial logistic regression.
        dropout: dropout rate on every hidden layer's output.
        input_dropout: dropout rate on the input pixels.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (1200, 1200),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        for label, rate in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"mlp {label} must be in [0, 1), got {rate}")
        if any(int(h) < 1 for h in hidden):
            raise ConfigError(f"mlp hidden widths must be positive integers, got {list(hidden)}")
        self.num_classes = num_classes
        self.in_features = in_features
        # Dropout on a layer's input is dropout on the previous layer's units (Srivastava et al.).
        stages = []
        width, rate = in_features, input_dropout
        for h in hidden:
            stages.append(nn.Sequential(nn.Dropout(rate), nn.Linear(width, int(h)), nn.ReLU(inplace=True)))
            width, rate = int(h), dropout
        self.stages = nn.ModuleList(stages)
        self.head_dropout = nn.Dropout(rate)
        self.fc = nn.Linear(width, num_classes)
        self.feature_channels = [int(h) for h in hidden] or [in_features]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ConfigError(
                f"this MLP was built for inputs of {self.in_features} values (in_channels * image_size**2) "
                f"but got {x.shape[1]}; set image_size/in_channels to the data's."
            )
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats or [x]

    def forward_head(self, feature: Tensor) -> Tensor:
        return self.fc(self.head_dropout(feature))


def _in_features(in_channels: int, image_size: int | Sequence[int] | None) -> int:
    if image_size is None:
        raise ConfigError(
            "MLP models flatten the image, so they need image_size (e.g. image_size=28 for MNIST); "
            "pass it to create_model."
        )
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    return in_channels * int(height) * int(width)


@register_model
def mlp(
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    hidden: Sequence[int] = (1200, 1200),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
) -> MLP:
    """MLP with the given hidden widths; ``image_size`` may be an int or ``(height, width)``."""
    return MLP(_in_features(in_channels, image_size), num_classes, hidden, dropout, input_dropout)


def _preset(widths: tuple[int, ...], dropout: float, input_dropout: float, doc: str):
    name = "mlp_" + "_".join(str(w) for w in widths)

    def build(
        num_classes: int,
        in_channels: int = 3,
        image_size: int | None = None,
        dropout: float = dropout,
        input_dropout: float = input_dropout,
        width: float = 1.0,
    ) -> MLP:
        hidden = scale_widths(widths, width)
        return MLP(_in_features(in_channels, image_size), num_classes, hidden, dropout, input_dropout)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc + " ``width`` multiplies the hidden widths (ResidualKD derives narrower networks with it)."
    return build


register_model(_preset((1200, 1200), 0.5, 0.2, "Hinton et al.'s MNIST teacher: 2×1200 ReLU, dropout 0.5 (input 0.2)."))
register_model(_preset((800, 800), 0.0, 0.0, "Hinton et al.'s MNIST student: 2×800 ReLU, no dropout."))
register_model(_preset((300, 300), 0.0, 0.0, "Smaller student of Hinton et al.: 2×300 ReLU, no dropout."))
register_model(_preset((30, 30), 0.0, 0.0, "Smallest student of Hinton et al.: 2×30 ReLU, no dropout."))
