"""The model zoo: every network a method can train or use as a teacher.

Create networks by name::

    from distill.models import create_model, list_models

    model = create_model("resnet32x4", num_classes=100)
    logits, feats = model.forward_with_features(images)

Families (one module each):

* :mod:`~distill.models.cifar_resnet`: ``resnet8`` … ``resnet110``, ``resnet8x4``, ``resnet32x4``
  (RepDistiller/mdistiller CIFAR ResNets; their checkpoints load unchanged);
* :mod:`~distill.models.wrn`: ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (same);
* :mod:`~distill.models.takd_cnn`: ``takd_cnn2`` … ``takd_cnn10`` and ``..._c100`` (TAKD plain CNNs);
* :mod:`~distill.models.mlp`: ``mlp`` and presets ``mlp_1200_1200``, ``mlp_800_800``, ``mlp_300_300``,
  ``mlp_30_30`` (Hinton et al.'s MNIST networks; need ``image_size``);
* :mod:`~distill.models.external`: ``tv.<name>`` (torchvision) and ``timm.<name>`` (timm, if installed).

Every zoo network is a :class:`ClassifierModel` (see :mod:`distill.models.base` for the contract); ``create_model``
also builds your own network class named by its import path (``mypackage.models.MyNet``).
New families register builders with :func:`register_model`.
"""

from distill.models.base import ClassifierModel
from distill.models.registry import create_model, list_models, register_model

# Imported for their registrations.
from distill.models import cifar_resnet, mlp, takd_cnn, wrn  # noqa: E402,F401  isort: skip
from distill.models import residual  # noqa: E402,F401  isort: skip  (after the families it combines)
from distill.models import external  # noqa: E402,F401  isort: skip  (registers the tv. and timm. prefixes)
from distill.models.peers import PEER_ARCHITECTURES, convert_peer_state_dict  # noqa: E402

__all__ = [
    "ClassifierModel",
    "PEER_ARCHITECTURES",
    "convert_peer_state_dict",
    "create_model",
    "list_models",
    "register_model",
]
