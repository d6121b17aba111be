"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-``d``-``k``: depth ``d = 6n + 4``, widening factor ``k``; a 3×3 stem convolution to 16 channels,
three groups of ``n`` pre-activation blocks (BN-ReLU-conv3×3-BN-ReLU-[dropout]-conv3×3) of widths
``16k``, ``32k``, ``64k`` at strides 1, 2, 2, a final BN-ReLU, global average pooling and a linear layer.

The architecture, module names (including ``convShortcut``) and initialisation follow RepDistiller's
``models/wrn.py`` and mdistiller's ``mdistiller/models/cifar/wrn.py`` so that their published
checkpoints load with ``model.load_state_dict(ckpt["model"])`` unchanged. As there, a block whose
input and output widths differ applies its first BN-ReLU before *both* the residual branch and the
1×1 projection shortcut, while an identity block adds its raw input.

Differences from the peers' code, none of which changes the function at 32×32 input:

* adaptive global average pooling instead of ``F.avg_pool2d(out, 8)``, so any input size works;
* the stem takes ``in_channels`` inputs; the dropout option is called ``drop_rate`` (``dropRate``);
* :meth:`WideResNet.forward_features` returns the three group outputs, the last one *after* the
  final BN-ReLU (that is the map the head pools). The peers' feature list instead ends with the raw
  output of the third group, before that BN-ReLU.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.base import ClassifierModel
from distill.models.registry import register_model, scale_widths


class BasicBlock(nn.Module):
    """Pre-activation wide block; a projection shortcut when the width or resolution changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # The peers decide the shortcut by width only (a stride-2 block always changes width in a WRN).
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One group of ``nb_layers`` blocks; named as in the peers' code (``blockN.layer.i``)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ClassifierModel):
    """WRN-``depth``-``widen_factor``.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        num_classes: size of the logits.
        widen_factor: ``k``; group widths are ``16k``, ``32k``, ``64k``.
        drop_rate: dropout between the two convolutions of every block (0 as in the peers' CIFAR
            teachers; the WRN paper used 0.3 for some results).
        in_channels: image channels.
        width: multiplies every width, the stem's included (1 = the published network; ResidualKD
            derives narrower students and assistants with it).

    Features: the outputs of ``block1``, ``block2`` and ``relu(bn1(block3(.)))``.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        widen_factor: int = 1,
        drop_rate: float = 0.0,
        in_channels: int = 3,
        width: float = 1.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = scale_widths([16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor], width)
        for i in (2, 3):  # a strided group must change width: its blocks choose their shortcut by width alone
            widths[i] = max(widths[i], widths[i - 1] + 1)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        self.feature_channels = widths[1:]

        # The peers' initialisation: N(0, 2/(k*k*out_channels)) for convolutions (Kaiming fan-out),
        # unit BatchNorm scale, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        out = self.conv1(x)
        f1 = self.block1(out)
        f2 = self.block2(f1)
        f3 = self.relu(self.bn1(self.block3(f2)))
        return [f1, f2, f3]

    def forward_head(self, feature: Tensor) -> Tensor:
        return self.fc(self.avgpool(feature).flatten(1))


def _builder(depth: int, k: int):
    name = f"wrn_{depth}_{k}"

    def build(
        num_classes: int, in_channels: int = 3, image_size: int | None = None, drop_rate: float = 0.0,
        width: float = 1.0,
    ) -> WideResNet:
        return WideResNet(depth, num_classes, widen_factor=k, drop_rate=drop_rate, in_channels=in_channels,
                          width=width)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"WRN-{depth}-{k} (pre-activation, dropout ``drop_rate``); RepDistiller/mdistiller's ``{name}``."
    return build


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(_builder(_depth, _k))
