"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

Depth ``6n + 2``: a 3×3 stem convolution, three stages of ``n`` BasicBlocks (two 3×3 convolutions
each) at strides 1, 2, 2, global average pooling and one linear layer.

The architecture, module names and initialisation follow the CIFAR ResNets of RepDistiller
(HobbitLong/RepDistiller, ``models/resnet.py``) and mdistiller (megvii-research/mdistiller,
``mdistiller/models/cifar/resnet.py``), the code behind most published CIFAR-100 distillation
results, so their published teacher checkpoints load with ``model.load_state_dict(ckpt["model"])``
unchanged. TAKD's ``resnet_cifar.py`` (the ``resnet<N>`` of Mirzadeh et al.) is the same network with
the same names, 16/32/64 widths only. Choices shared with them that differ from He et al.:

* shortcuts that change shape are 1×1 convolution + BatchNorm projections ("option B"); the paper
  used parameter-free zero-padding shortcuts ("option A") on CIFAR, so the parameter counts are
  slightly higher (resnet20: 0.278M instead of 0.27M);
* ``resnet8x4``/``resnet32x4`` (introduced by CRD, Tian et al. 2020) have a 32-channel stem and stage
  widths 64/128/256, so their first stage also starts with a projection shortcut.

Differences from the peers' code, none of which changes the function at 32×32 input:

* global average pooling is adaptive (``nn.AdaptiveAvgPool2d(1)``) instead of ``nn.AvgPool2d(8)``, so
  the networks accept any input size (at 32×32 the final map is 8×8 and both are the same);
* the stem convolution takes ``in_channels`` inputs;
* features come from :meth:`forward_features` (the three stage outputs, post-ReLU) instead of an
  ``is_feat`` flag; the peers additionally return the stem output, which is not a stage here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.models.base import ClassifierModel, kaiming_init
from distill.models.registry import register_model, scale_widths


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(ClassifierModel):
    """A CIFAR ResNet of depth ``6n + 2`` with BasicBlocks.

    Args:
        depth: total depth, ``6n + 2`` (8, 14, 20, 26, 32, 44, 56, 110, ...).
        num_filters: ``[stem, stage1, stage2, stage3]`` widths, e.g. ``[16, 16, 32, 64]``.
        num_classes: size of the logits.
        in_channels: image channels.

    Features: the outputs of ``layer1``, ``layer2``, ``layer3`` (strides 1, 2, 4 of the input).
    """

    def __init__(self, depth: int, num_filters: Sequence[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        self.feature_channels = [c * BasicBlock.expansion for c in num_filters[1:4]]

        kaiming_init(self)  # the peers' initialisation

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]

    def forward_head(self, feature: Tensor) -> Tensor:
        return self.fc(self.avgpool(feature).flatten(1))


_NARROW = (16, 16, 32, 64)
_WIDE_X4 = (32, 64, 128, 256)


def _builder(depth: int, widths: Sequence[int], name: str):
    def build(num_classes: int, in_channels: int = 3, image_size: int | None = None, width: float = 1.0) -> CifarResNet:
        return CifarResNet(depth, scale_widths(widths, width), num_classes, in_channels)

    build.__name__ = build.__qualname__ = name
    stem, w1, w2, w3 = widths
    build.__doc__ = (
        f"CIFAR ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage, stem {stem}, stages "
        f"{w1}/{w2}/{w3}); RepDistiller/mdistiller's ``{name}``. ``width`` multiplies every width "
        "(ResidualKD derives narrower students and assistants with it; 1 is the published network)."
    )
    return build


for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    register_model(_builder(_depth, _NARROW, f"resnet{_depth}"))
for _depth in (8, 32):
    register_model(_builder(_depth, _WIDE_X4, f"resnet{_depth}x4"))
