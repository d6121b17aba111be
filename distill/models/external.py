"""torchvision (``tv.<name>``) and timm (``timm.<name>``) networks behind the zoo interface.

Both are wrapped, not copied: the original network is ``model.net``. ``state_dict()`` keys therefore
start with ``net.``; ``load_state_dict`` also accepts the plain torchvision/timm keys (a file saved
from the bare network), adding the prefix itself.

torchvision
-----------
Any name of ``torchvision.models.list_models(module=torchvision.models)``. ``pretrained=True`` loads
the ``"DEFAULT"`` ImageNet weights (downloaded into torch hub's cache, ``torch.hub.get_dir()``); a
failed download raises :class:`~distill.errors.CheckpointError`. With pretrained weights,

* ``num_classes`` other than 1000 replaces every ImageNet classifier layer (the main head and the
  auxiliary heads of GoogLeNet/Inception) by a freshly initialised one;
* ``in_channels`` other than 3 replaces the first convolution; its new weights are the sum of the
  pretrained RGB filters divided by ``in_channels``, so an image whose channels all equal a grey
  image gives the same response as that grey image in RGB. GoogLeNet/Inception then stop applying
  their RGB-specific ``transform_input``.

Without pretrained weights the network is simply built with ``num_classes`` and the first
convolution rebuilt for ``in_channels``. For ``vit_*`` models without pretrained weights,
``image_size`` is passed on to the builder (pretrained ViTs need 224×224 inputs). Other builder
options go through ``**kwargs`` (e.g. ``dropout=0.2``). ResNets (``tv.resnet18`` …) also take
``width``, a multiplier of every stage's width (ResidualKD derives narrower networks with it).

:meth:`forward_features` support (stage features, shallow to deep; the last one feeds the head):

=====================================================  ==============================================
family                                                  features
=====================================================  ==============================================
ResNet, ResNeXt, Wide ResNet                            ``layer1`` … ``layer4`` outputs (4)
RegNet                                                  the 4 stages of ``trunk_output``
ShuffleNetV2                                            ``stage2``, ``stage3``, ``conv5(stage4(.))``
VGG, AlexNet, MobileNetV2/V3, EfficientNet(V2),         ``[features(x)]`` (final map only)
ConvNeXt, DenseNet, SqueezeNet
MNASNet                                                 ``[layers(x)]``
Swin (V1/V2)                                            ``[features(x)]`` permuted to NCHW
VisionTransformer                                       ``[encoder tokens]``, ``[B, 1 + patches, D]``
GoogLeNet, Inception3, MaxViT                           not supported: ``forward`` works (in training
                                                        mode it returns the main logits only);
                                                        ``forward_features`` raises ConfigError
=====================================================  ==============================================

timm
----
Any ``timm.list_models()`` name (pretrained tags such as ``resnet18.a1_in1k`` too), when timm is
installed. timm itself handles ``pretrained``, ``num_classes`` and ``in_chans``. Features are
timm's ``forward_intermediates`` (where the model has it) with the last one replaced by (or, when
its shape differs, followed by) the output of ``forward_features``; the head is timm's
``forward_head``. Models without ``forward_intermediates`` give ``[forward_features(x)]``. The
layout is timm's: token models (ViT) give token tensors as their final feature.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import CheckpointError, ConfigError
from distill.models.base import ClassifierModel, kaiming_init
from distill.models.registry import register_source, scale_widths, unknown_name_error

# Input side used to find out the channels of each feature at construction (small enough to be
# cheap, large enough for every supported torchvision family).
_PROBE_SIZE = 64


def torchvision_model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_model_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def _add_net_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-time hook: lets a wrapper load the bare network's state_dict (keys without ``net.``)."""
    own = [k for k in state_dict if k.startswith(prefix)]
    if not own or any(k.startswith(prefix + "net.") for k in own):
        return
    for key in own:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


def _feature_width(t: Tensor) -> int:
    # NCHW maps: channels; tokens [B, N, D] and vectors [B, D]: the last dimension.
    return int(t.shape[1]) if t.dim() == 4 else int(t.shape[-1])


class ExternalModel(ClassifierModel):
    """Common part of the torchvision and timm wrappers."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.feature_channels = []
        self.register_load_state_dict_pre_hook(_add_net_prefix)

    @torch.no_grad()
    def _probe_channels(self, in_channels: int, size: tuple[int, int]) -> list[int]:
        was_training = self.training
        self.eval()
        try:
            feats = self.forward_features(torch.zeros(1, in_channels, *size))
        finally:
            self.train(was_training)
        return [_feature_width(f) for f in feats]


# ---------------------------------------------------------------------------------- torchvision
def _tv_families() -> list[tuple[type, str]]:
    from torchvision import models as tvm

    return [
        (tvm.ResNet, "resnet"),
        (tvm.RegNet, "regnet"),
        (tvm.ShuffleNetV2, "shufflenet"),
        (tvm.VGG, "pooled_classifier"),
        (tvm.AlexNet, "pooled_classifier"),
        (tvm.MobileNetV3, "pooled_classifier"),
        (tvm.EfficientNet, "pooled_classifier"),
        (tvm.MobileNetV2, "mobilenet_v2"),
        (tvm.ConvNeXt, "convnext"),
        (tvm.DenseNet, "densenet"),
        (tvm.SqueezeNet, "squeezenet"),
        (tvm.MNASNet, "mnasnet"),
        (tvm.SwinTransformer, "swin"),
        (tvm.VisionTransformer, "vit"),
    ]


def _tv_features(net: nn.Module, family: str, x: Tensor) -> list[Tensor]:
    if family == "resnet":
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        feats = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            feats.append(x)
        return feats
    if family == "regnet":
        x = net.stem(x)
        feats = []
        for stage in net.trunk_output:
            x = stage(x)
            feats.append(x)
        return feats
    if family == "shufflenet":
        f2 = net.stage2(net.maxpool(net.conv1(x)))
        f3 = net.stage3(f2)
        return [f2, f3, net.conv5(net.stage4(f3))]
    if family == "mnasnet":
        return [net.layers(x)]
    if family == "swin":
        return [net.features(x).permute(0, 3, 1, 2)]
    if family == "vit":
        x = net._process_input(x)
        cls = net.class_token.expand(x.shape[0], -1, -1)
        return [net.encoder(torch.cat([cls, x], dim=1))]
    return [net.features(x)]


def _tv_head(net: nn.Module, family: str, f: Tensor) -> Tensor:
    # Each branch is the tail of the family's own forward(), after the part _tv_features runs.
    if family in ("resnet", "regnet", "pooled_classifier"):
        head = net.fc if family in ("resnet", "regnet") else net.classifier
        return head(torch.flatten(net.avgpool(f), 1))
    if family == "shufflenet":
        return net.fc(f.mean([2, 3]))
    if family == "mobilenet_v2":
        return net.classifier(torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1))
    if family == "convnext":
        return net.classifier(net.avgpool(f))
    if family == "densenet":
        # torchvision applies this ReLU in place; not here, so the returned feature stays intact.
        return net.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(f), (1, 1)), 1))
    if family == "squeezenet":
        return torch.flatten(net.classifier(f), 1)
    if family == "mnasnet":
        return net.classifier(f.mean([2, 3]))
    if family == "swin":
        x = net.norm(f.permute(0, 2, 3, 1))
        return net.head(net.flatten(net.avgpool(net.permute(x))))
    if family == "vit":
        return net.heads(f[:, 0])
    raise AssertionError(family)


class TorchvisionModel(ExternalModel):
    """A torchvision classification network; see the module docstring for what is supported."""

    def __init__(self, net: nn.Module, name: str, num_classes: int, in_channels: int):
        super().__init__(net, num_classes)
        self.tv_name = name
        self.family = next((fam for cls, fam in _tv_families() if isinstance(net, cls)), None)
        self.supports_features = self.family is not None
        if self.family == "vit":
            self.feature_channels = [int(net.hidden_dim)]
        elif self.family is not None:
            self.feature_channels = self._probe_channels(in_channels, (_PROBE_SIZE, _PROBE_SIZE))

    def forward(self, x: Tensor) -> Tensor:
        if self.family is not None:
            return super().forward(x)
        out = self.net(x)
        # GoogLeNet/Inception return (logits, aux logits...) named tuples in training mode.
        return out.logits if hasattr(out, "logits") else out

    def forward_features(self, x: Tensor) -> list[Tensor]:
        if self.family is None:
            raise ConfigError(
                f"tv.{self.tv_name} ({type(self.net).__name__}) has no stage features here; use it for "
                "logits only, or pick a supported family (ResNet, RegNet, ShuffleNetV2, VGG, AlexNet, "
                "MobileNet, EfficientNet, ConvNeXt, DenseNet, SqueezeNet, MNASNet, Swin, ViT)."
            )
        return _tv_features(self.net, self.family, x)

    def forward_head(self, feature: Tensor) -> Tensor:
        if self.family is None:
            raise ConfigError(f"tv.{self.tv_name} has no separate head here; call the model itself.")
        return _tv_head(self.net, self.family, feature)


def _replace_modules(
    root: nn.Module, select: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
) -> int:
    targets = [name for name, m in root.named_modules() if name and select(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(getattr(parent, child)))
    return len(targets)


def _replace_classifiers(net: nn.Module, old_classes: int, num_classes: int) -> None:
    from torchvision.models import SqueezeNet

    def is_head(m: nn.Module) -> bool:
        if isinstance(m, nn.Linear):
            return m.out_features == old_classes
        # SqueezeNet classifies with a 1×1 convolution.
        return isinstance(net, SqueezeNet) and isinstance(m, nn.Conv2d) and m.out_channels == old_classes

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.Linear):
            return nn.Linear(m.in_features, num_classes, bias=m.bias is not None)
        return nn.Conv2d(m.in_channels, num_classes, kernel_size=m.kernel_size, bias=m.bias is not None)

    if _replace_modules(net, is_head, make) == 0:
        raise ConfigError(f"cannot find the {old_classes}-class classifier of {type(net).__name__} to replace")


def _replace_first_conv(net: nn.Module, in_channels: int, adapt_weights: bool) -> None:
    first = next((n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError(f"{type(net).__name__} has no convolution to adapt to {in_channels} input channels")
    old: nn.Conv2d = net.get_submodule(first)
    if old.groups != 1:
        raise ConfigError(
            f"cannot adapt the grouped first convolution of {type(net).__name__} to {in_channels} channels"
        )

    def make(m: nn.Module) -> nn.Module:
        new = nn.Conv2d(
            in_channels, m.out_channels, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode,
        )
        if adapt_weights:
            with torch.no_grad():
                summed = m.weight.sum(dim=1, keepdim=True) / in_channels
                new.weight.copy_(summed.expand(-1, in_channels, -1, -1))
                if m.bias is not None:
                    new.bias.copy_(m.bias)
        return new

    _replace_modules(net, lambda m: m is old, make)
    if getattr(net, "transform_input", False):
        net.transform_input = False  # it rescales three RGB channels


def create_torchvision(
    name: str, num_classes: int, in_channels: int, image_size: int | None, pretrained: bool, **kwargs: Any
) -> TorchvisionModel:
    import torchvision

    names = torchvision_model_names()
    if name not in names:
        raise unknown_name_error("tv." + name, ["tv." + n for n in names], what="torchvision model")
    width = kwargs.pop("width", 1.0)
    if name.startswith("vit_") and image_size is not None and not pretrained:
        kwargs.setdefault("image_size", image_size)
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        if weights is not None:
            net = torchvision.models.get_model(name, weights=weights, **kwargs)
        else:
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except OSError as err:
        assert weights is not None
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise CheckpointError(
            f"could not download the pretrained weights of tv.{name} from {weights.url} "
            f"({type(err).__name__}: {str(err)[:120]}); without internet access, put that file at "
            f"{cached} (torch hub's cache, torch.hub.get_dir())."
        ) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build tv.{name} with options {kwargs}: {err}") from None
    if weights is not None and num_classes != len(weights.meta["categories"]):
        _replace_classifiers(net, len(weights.meta["categories"]), num_classes)
    if width != 1.0:
        _narrow_resnet(net, name, width, pretrained, num_classes)
    if in_channels != 3:
        _replace_first_conv(net, in_channels, adapt_weights=pretrained)
    return TorchvisionModel(net, name, num_classes, in_channels)


def _narrow_resnet(net: nn.Module, name: str, width: float, pretrained: bool, num_classes: int) -> None:
    """The ``width`` option of torchvision ResNets: every stage's width times ``width``, same depth.

    torchvision's builders have no such option (``width_per_group`` only widens Bottleneck interiors),
    so the stem and the four stages are rebuilt with torchvision's own ``_make_layer`` and initialised
    as torchvision does; module names stay torchvision's.
    """
    from torchvision.models.resnet import ResNet

    if pretrained or not isinstance(net, ResNet):
        raise ConfigError(f"tv.{name}: the width option exists for torchvision ResNets without pretrained "
                          f"weights only; got width={width} for {type(net).__name__}, pretrained={pretrained}.")
    stem, *planes = scale_widths([64, 64, 128, 256, 512], width)
    block = type(net.layer1[0])
    depths = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
    net.inplanes = stem
    net.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(stem)
    for index, (width_i, depth) in enumerate(zip(planes, depths)):
        setattr(net, f"layer{index + 1}", net._make_layer(block, width_i, depth, stride=1 if index == 0 else 2))
    net.fc = nn.Linear(planes[-1] * block.expansion, num_classes)
    kaiming_init(net)


# ---------------------------------------------------------------------------------- timm
class TimmModel(ExternalModel):
    """A timm network: features from ``forward_intermediates``, head from ``forward_head``."""

    def __init__(self, net: nn.Module, name: str, num_classes: int, in_channels: int):
        super().__init__(net, num_classes)
        self.timm_name = name
        self.use_intermediates = hasattr(net, "forward_intermediates")
        self.replace_last = True
        probe = torch.zeros(1, in_channels, *self._probe_size(net))
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                if self.use_intermediates:
                    try:
                        final, inter = net.forward_intermediates(probe)
                    except NotImplementedError:  # declared by a base class but not implemented
                        self.use_intermediates = False
                    else:
                        self.replace_last = bool(inter) and inter[-1].shape == final.shape
                feats = self._compose(final, inter) if self.use_intermediates else [net.forward_features(probe)]
        finally:
            net.train(was_training)
        self.feature_channels = [_feature_width(f) for f in feats]

    @staticmethod
    def _probe_size(net: nn.Module) -> tuple[int, int]:
        fixed = getattr(getattr(net, "patch_embed", None), "img_size", None)
        if fixed is not None:
            return tuple(int(s) for s in fixed)  # type: ignore[return-value]
        size = net.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        return tuple(int(s) for s in size)  # type: ignore[return-value]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        if not self.use_intermediates:
            return [self.net.forward_features(x)]
        return self._compose(*self.net.forward_intermediates(x))

    def _compose(self, final: Tensor, inter: list[Tensor]) -> list[Tensor]:
        return (list(inter[:-1]) if self.replace_last else list(inter)) + [final]

    def forward_head(self, feature: Tensor) -> Tensor:
        return self.net.forward_head(feature)


def create_timm(
    name: str, num_classes: int, in_channels: int, image_size: int | None, pretrained: bool, **kwargs: Any
) -> TimmModel:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm.{name} needs timm, which is not installed: pip install timm") from None
    if not timm.is_model(name):
        raise unknown_name_error("timm." + name, ["timm." + n for n in timm.list_models()], what="timm model")
    build = dict(num_classes=num_classes, in_chans=in_channels, **kwargs)
    try:
        # Built once without weights first, so that a bad option is reported as such and not as a
        # failed download (timm's download errors come from several libraries).
        net = timm.create_model(name, pretrained=False, **build)
        if pretrained:
            try:
                net = timm.create_model(name, pretrained=True, **build)
            except Exception as err:  # hub/HTTP/file errors of several libraries
                from huggingface_hub.constants import HF_HUB_CACHE

                raise CheckpointError(
                    f"could not download the pretrained weights of timm.{name} "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                    f"without internet access, put them in the Hugging Face cache ({HF_HUB_CACHE}) "
                    f"or torch hub's cache ({torch.hub.get_dir()})."
                ) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build timm.{name} with options {kwargs}: {err}") from None
    return TimmModel(net, name, num_classes, in_channels)


# The registry routes ``tv.*`` and ``timm.*`` names here; distill.models imports this module for it.
register_source("tv.", create_torchvision, torchvision_model_names)
register_source("timm.", create_timm, timm_model_names)
