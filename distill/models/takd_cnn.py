"""Plain CNNs of TAKD (Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant",
AAAI 2020), as built by the official code (imirzadeh/Teacher-Assistant-Knowledge-Distillation,
``plain_cnn_cifar.py``, the ``plane<N>`` models of ``model_factory.py``).

Notation: ``Cn`` is a 3×3 convolution (padding 1, *with* bias, as in the official code) + BatchNorm +
ReLU with ``n`` filters, ``P`` a 2×2 max-pool, ``FCn`` a linear layer; hidden FC layers are followed
by ReLU (no dropout), the last one has ``num_classes`` outputs.

=====  ===============================================  ============================================
size   ``takd_cnn<size>`` (CIFAR-10 column)             ``takd_cnn<size>_c100`` (CIFAR-100 column)
=====  ===============================================  ============================================
2      C16-P-C16-P-FC                                   C32-P-C32-P-FC
4      C16,C16-P-C32,C32-P-FC                           C32,C32-P-C64,C64-P-FC
6      C16,C16-P-C32,C32-P-C64,C64-P-FC                 C32,C32-P-C64,C64-P-C128,C128-FC (no last P)
8      C16,C16-P-C32,C32-P-C64,C64-P-C128,C128-P-       C32,C32-P-C64,C64-P-C128,C128-P-C256,C256-P-
       FC64-FC                                          FC64-FC
10     C32,C32-P-C64,C64-P-C128,C128-P-C256×4-P-        same convolutions, FC512-FC
       FC128-FC
=====  ===============================================  ============================================

The official code flattens the final feature map of a 32×32 input, so its first FC layer is sized
for that grid (8×8, 4×4 or 2×2). To stay identical at 32×32 yet accept any input size, the head
here starts with ``nn.AdaptiveAvgPool2d`` to that grid: at 32×32 it is the identity, at other
sizes it average-pools (or, for smaller inputs, replicates) the final map to the grid the FC layer
expects. Module names (``conv_layers``, ``fc_layers`` with the official indices) match the official
code, so its checkpoints load unchanged.

Features: the output of each group of convolutions, after its max-pool when it has one (e.g. two
features for size 2, four for size 10); the last is the map the head pools and flattens.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.models.base import ClassifierModel
from distill.models.registry import register_model

# The official specifications ("P" = max-pool), FC sizes before the final num_classes layer.
_CONVS_C10: dict[int, list[int | str]] = {
    2: [16, "P", 16, "P"],
    4: [16, 16, "P", 32, 32, "P"],
    6: [16, 16, "P", 32, 32, "P", 64, 64, "P"],
    8: [16, 16, "P", 32, 32, "P", 64, 64, "P", 128, 128, "P"],
    10: [32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P"],
}
_CONVS_C100: dict[int, list[int | str]] = {
    2: [32, "P", 32, "P"],
    4: [32, 32, "P", 64, 64, "P"],
    6: [32, 32, "P", 64, 64, "P", 128, 128],
    8: [32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, "P"],
    10: [32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P"],
}
_HIDDEN_C10 = {2: [], 4: [], 6: [], 8: [64], 10: [128]}
_HIDDEN_C100 = {2: [], 4: [], 6: [], 8: [64], 10: [512]}

#: Input resolution the official code assumes when sizing the first FC layer.
REFERENCE_SIZE = 32


class TakdCNN(ClassifierModel):
    """A plain CNN from a layer specification.

    Args:
        convs: conv widths in order, with ``"P"`` for a 2×2 max-pool.
        hidden: widths of the hidden FC layers (each followed by ReLU).
        num_classes: size of the logits.
        in_channels: image channels.
    """

    def __init__(self, convs: Sequence[int | str], hidden: Sequence[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        # Indices into conv_layers after which a stage ends (after its pool, or the last layer).
        self._stage_ends: list[int] = []
        self.feature_channels = []
        channels, grid = in_channels, REFERENCE_SIZE
        for item in convs:
            if item == "P":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                grid //= 2
                self._stage_ends.append(len(layers) - 1)
                self.feature_channels.append(channels)
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        if convs[-1] != "P":
            self._stage_ends.append(len(layers) - 1)
            self.feature_channels.append(channels)
        self.conv_layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        fcs: list[nn.Module] = []
        width = channels * grid * grid
        for h in hidden:
            fcs += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        fcs.append(nn.Linear(width, num_classes))
        self.fc_layers = nn.Sequential(*fcs)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        feats = []
        ends = set(self._stage_ends)
        for i, layer in enumerate(self.conv_layers):
            x = layer(x)
            if i in ends:
                feats.append(x)
        return feats

    def forward_head(self, feature: Tensor) -> Tensor:
        return self.fc_layers(self.pool(feature).flatten(1))


def _builder(size: int, cifar100: bool):
    name = f"takd_cnn{size}" + ("_c100" if cifar100 else "")
    convs = (_CONVS_C100 if cifar100 else _CONVS_C10)[size]
    hidden = (_HIDDEN_C100 if cifar100 else _HIDDEN_C10)[size]

    def build(num_classes: int, in_channels: int = 3, image_size: int | None = None) -> TakdCNN:
        return TakdCNN(convs, hidden, num_classes, in_channels)

    build.__name__ = build.__qualname__ = name
    spec = "-".join(("P" if c == "P" else f"C{c}") for c in convs) + "".join(f"-FC{h}" for h in hidden) + "-FC"
    build.__doc__ = f"TAKD plain CNN ``plane{size}``, {'CIFAR-100' if cifar100 else 'CIFAR-10'} variant: {spec}."
    return build


for _size in (2, 4, 6, 8, 10):
    register_model(_builder(_size, cifar100=False))
    register_model(_builder(_size, cifar100=True))
