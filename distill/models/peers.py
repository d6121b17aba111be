"""Loading CIFAR teachers published by RepDistiller and mdistiller.

Their checkpoints are ``{"model": state_dict, ...}`` files (RepDistiller's ``save/models/*/ckpt``,
mdistiller's ``download_ckpts/cifar_teachers``). The zoo's ``resnet*`` and ``wrn_*`` networks use
the same module names, so the state_dict loads as it is::

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("resnet32x4", num_classes=100)
    model.load_state_dict(ckpt["model"])

:func:`convert_peer_state_dict` only does the trivial rest: it unwraps the ``"model"`` (or
``"state_dict"``) entry and removes the ``module.`` prefix that ``nn.DataParallel`` adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from distill.errors import CheckpointError
from distill.models.registry import unknown_name_error

#: Zoo names whose architecture and parameter names equal RepDistiller's and mdistiller's.
PEER_ARCHITECTURES = (
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
)  # fmt: skip


def convert_peer_state_dict(arch_name: str, state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Returns a state_dict for ``create_model(arch_name, ...)`` from a RepDistiller/mdistiller one.

    ``state_dict`` may be the state_dict itself or the whole checkpoint holding it under ``"model"``
    or ``"state_dict"``. Keys need no renaming; a ``module.`` prefix is removed.
    """
    if arch_name not in PEER_ARCHITECTURES:
        raise unknown_name_error(arch_name, list(PEER_ARCHITECTURES), what="RepDistiller/mdistiller architecture")
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"entry {key!r} of the {arch_name} checkpoint is not a tensor ({type(value).__name__})"
            )
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out
