"""The interface every network of the zoo implements.

Distillation methods need more than logits: feature-based methods (FitNets, attention transfer,
CRD, ...) read intermediate feature maps, and representation methods read the embedding the
classifier sees. :class:`ClassifierModel` splits every network into a *body* that returns one feature
per stage and a *head* that turns the last feature into logits, so a method can take both from one
forward pass::

    logits, feats = model.forward_with_features(images)

Contract (checked by ``tests/test_models.py`` for every registered model):

* ``forward_features(x)`` returns a list with the output of each stage, shallow to deep. The stem
  counts as part of the first stage (it is not a separate entry). The **last** element is the final
  feature map, exactly what the head pools/flattens; for the convolutional networks of the zoo it is
  post-activation, so its global average pool is the embedding the classifier sees.
* ``forward_head(feats[-1])`` returns the logits, ``[batch, num_classes]``.
* ``forward(x) == forward_head(forward_features(x)[-1])``; subclasses need not override ``forward``.
* ``feature_channels[i]`` is the channel count (dim 1) of ``feats[i]`` (for the MLPs and token
  features: the size of the last dimension).
"""

from __future__ import annotations

from torch import Tensor, nn


class ClassifierModel(nn.Module):
    """Base class: a classifier split into stage features and a head.

    Attributes:
        num_classes: size of the logits.
        feature_channels: channels (or width) of each element of :meth:`forward_features`.
        model_name: the registry name it was created under (set by ``create_model``), or ``None``.
        supports_features: ``False`` only for external networks whose stages are not exposed
            (see :mod:`distill.models.external`); their ``forward`` works, ``forward_features`` raises.
    """

    num_classes: int
    feature_channels: list[int]
    model_name: str | None = None
    supports_features: bool = True

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Returns the output of each stage, shallow to deep; the last one feeds the head."""
        raise NotImplementedError

    def forward_head(self, feature: Tensor) -> Tensor:
        """Maps the final feature (``forward_features(x)[-1]``) to logits."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)[-1])

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and stage features from a single pass through the body."""
        feats = self.forward_features(x)
        return self.forward_head(feats[-1]), feats


def kaiming_init(module: nn.Module) -> None:
    """He (fan-out) initialisation of convolutions, unit scale and zero shift of BatchNorms: the
    initialisation of the CIFAR ResNets in RepDistiller/mdistiller and of torchvision's ResNets."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
