"""Deriving ResidualKD's student S and assistant A from one given network, and their cost.

Gao et al. (arXiv 2002.09168, §3.5 "Separating A from S") derive S and A from a pre-designed model so
that S + A costs no more than that model, and report that an A of about 1/10 of S suffices. The
paper's exact procedure was not retrievable, so this module defines one (documented in docs/methods.md, ResidualKD):

* S and A are the given architecture at reduced **width** (the zoo builders' ``width`` option: every
  channel count times a factor, depth unchanged);
* A's factor is the largest whose cost (body + connector) is at most ``assistant_ratio`` (default 0.1)
  times S's cost (body + connector);
* S's factor is the largest for which the whole S+A predictor — S and A bodies, both connectors, the
  classifier — costs no more FLOPs than the given model's forward pass.

Costs are FLOPs of one forward pass at the data's image size, counted by ``torch.utils.flop_counter.
FlopCounterMode`` (2 FLOPs per multiply-add of convolutions and matrix products; BatchNorm, ReLU,
pooling, additions are not counted, for either side of the comparison), for a batch of one image.

``distill residual-budget`` (:mod:`distill.tools.residual_budget`) prints the split for any network.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.errors import ConfigError
from distill.models import create_model
from distill.models.residual import PooledLinear, ResidualPair, connector, feature_shape

#: Width factors are multiples of 1/WIDTH_STEPS.
WIDTH_STEPS = 128


def count_flops(fn: Any, *args: Any) -> int:
    """FLOPs of ``fn(*args)`` as counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return int(counter.get_total_flops())


def count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@dataclass
class PairCost:
    """Parameters and FLOPs of the parts of a :class:`ResidualPair` and of the given model."""

    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def table(self) -> str:
        lines = ["| network | params | MFLOPs | FLOPs vs given |", "|---|---|---|---|"]
        given = self.rows.get("given model", {}).get("flops")
        for name, row in self.rows.items():
            share = f"{row['flops'] / given:.3f}" if given else "–"
            lines.append(f"| {name} | {row['params']:,} | {row['flops'] / 1e6:.2f} | {share} |")
        return "\n".join(lines)

    def within_budget(self) -> bool:
        return self.rows["S+A"]["flops"] <= self.rows["given model"]["flops"]


def pair_cost(pair: ResidualPair, given: nn.Module | None, in_channels: int, image_size: int) -> PairCost:
    """Params and FLOPs of S (body + connector), A (body + connector), the classifier, S+A and the given model."""
    x = torch.zeros(1, in_channels, image_size, image_size, device=next(pair.parameters()).device)
    with torch.no_grad():
        s_feature, a_feature = pair.student_feature(x), pair.assistant_feature(x)
    # parameters that the prediction uses (S's and A's own classifiers are not)
    rows = {
        "S (+connector)": {"params": pair.used_parameters(pair.student, pair.student_connector),
                           "flops": count_flops(pair.student_feature, x)},
        "A (+connector)": {"params": pair.used_parameters(pair.assistant, pair.assistant_connector),
                           "flops": count_flops(pair.assistant_feature, x)},
        "classifier": {"params": count_params(pair.head), "flops": count_flops(pair.head, s_feature + a_feature)},
        "S+A": {"params": pair.used_parameters(), "flops": count_flops(pair, x)},
    }
    if given is not None:
        gx = x.to(next(given.parameters()).device)
        rows["given model"] = {"params": count_params(given), "flops": count_flops(given, gx)}
    return PairCost(rows)


def build_network(name: str, kwargs: dict[str, Any], **common: Any) -> nn.Module:
    return create_model(name, **common, **kwargs).eval()


def _shell(name: str, kwargs: dict[str, Any], **common: Any) -> nn.Module:
    """The network with uninitialised weights (built on the meta device, then allocated on the CPU):
    enough to count FLOPs, which depend on shapes only, without paying for initialisation. (Counting on
    the meta device itself is slower: BatchNorm runs there as a Python decomposition.)"""
    with torch.device("meta"):
        network = create_model(name, **common, **kwargs)
    return network.to_empty(device="cpu").eval()


def build_pair(pair_kwargs: dict[str, Any], **common: Any) -> ResidualPair:
    return build_network("residual_pair", pair_kwargs, **common)  # type: ignore[return-value]


def pair_kwargs(model: str, model_kwargs: dict[str, Any] | None, student_width: float, assistant_width: float,
                target_shape: Sequence[int]) -> dict[str, Any]:
    """``residual_pair`` options for S and A = ``model`` at the given width factors (relative to ``model_kwargs``)."""
    base = dict(model_kwargs or {})
    scale = float(base.pop("width", 1.0))
    return {
        "student": model, "student_kwargs": {**base, "width": round(scale * student_width, 6)},
        "assistant": model, "assistant_kwargs": {**base, "width": round(scale * assistant_width, 6)},
        "target_shape": [int(d) for d in target_shape],
    }


def derive_pair(model: str, model_kwargs: dict[str, Any] | None, target_shape: Sequence[int], num_classes: int,
                in_channels: int = 3, image_size: int | None = None, assistant_ratio: float = 0.1) -> dict[str, Any]:
    """``residual_pair`` options whose S and A are ``model`` narrowed so that S+A fits ``model``'s FLOPs.

    See the module docstring for the rule. Raises :class:`ConfigError` when ``model`` has no ``width``
    option or when no pair fits the budget. The search is deterministic, and cached per process.
    """
    key = json.dumps([model, model_kwargs or {}, [int(d) for d in target_shape], num_classes, in_channels, image_size,
                      assistant_ratio], sort_keys=True)
    return copy.deepcopy(_derive_pair(key))


@functools.lru_cache(maxsize=32)
def _derive_pair(key: str) -> dict[str, Any]:
    return _search(*json.loads(key))


def _search(
    model: str,
    model_kwargs: dict[str, Any] | None,
    target_shape: Sequence[int],
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    assistant_ratio: float = 0.1,
) -> dict[str, Any]:
    if not 0 < assistant_ratio < 1:
        raise ConfigError(f"assistant_ratio must be in (0, 1) (FLOPs of A / FLOPs of S), got {assistant_ratio}")
    common = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    size = image_size or 32
    x = torch.zeros(1, in_channels, size, size)
    try:
        given = _shell(model, {**dict(model_kwargs or {}), "width": float((model_kwargs or {}).get("width", 1.0))},
                       **common)
    except ConfigError as err:
        raise ConfigError(f"ResidualKD derives S and A from {model!r} by narrowing it, but: {err} Give `assistant` "
                          "(and `assistant_kwargs`, `student_kwargs`) explicitly instead.") from None
    budget = count_flops(given, x)
    head = count_flops(PooledLinear(target_shape[0], num_classes), torch.zeros(1, *target_shape))

    @functools.lru_cache(maxsize=None)
    def cost(step: int) -> int:
        """Exact FLOPs of ``model`` at width step/WIDTH_STEPS with its connector to the teacher (S or A alike)."""
        width = step / WIDTH_STEPS
        network = _shell(model, pair_kwargs(model, model_kwargs, width, width, target_shape)["student_kwargs"],
                         **common)
        bridge = connector(feature_shape(network, in_channels, image_size), target_shape)
        return count_flops(lambda images: bridge(network.forward_features(images)[-1]), x)

    # Convolution FLOPs grow about quadratically with width: a quadratic through three exact counts
    # predicts the split; exact counts then move it to the largest pair that really fits.
    anchors = [WIDTH_STEPS, WIDTH_STEPS // 2, WIDTH_STEPS // 4]
    coefficients = np.polyfit(anchors, [cost(k) for k in anchors], 2)
    predicted = np.polyval(coefficients, np.arange(WIDTH_STEPS + 1)).tolist()

    def approx(step: int) -> float:
        return predicted[step]

    def assistant_step(student: int, flops: Any) -> int | None:
        """Largest A step ≤ S's with flops(A) ≤ ratio · flops(S) (exact when ``flops`` is ``cost``)."""
        limit = assistant_ratio * flops(student)
        guess = max((k for k in range(1, student + 1) if approx(k) <= limit), default=1)
        if flops is approx:
            return guess if approx(guess) <= limit else None
        while guess > 1 and cost(guess) > limit:
            guess -= 1
        while guess < student and cost(guess + 1) <= limit:
            guess += 1
        return guess if cost(guess) <= limit else None

    def fits(student: int, flops: Any = cost) -> bool:
        assistant = assistant_step(student, flops)
        return assistant is not None and flops(student) + flops(assistant) + head <= budget

    student = max((k for k in range(1, WIDTH_STEPS + 1) if fits(k, approx)), default=1)
    while student > 1 and not fits(student):
        student -= 1
    while student < WIDTH_STEPS and fits(student + 1):
        student += 1
    if not fits(student):
        raise ConfigError(f"no student/assistant pair derived from {model!r} fits its own FLOPs with an assistant of "
                          f"{assistant_ratio} of the student (connectors to the teacher's {list(target_shape)} map "
                          "are too costly); give `assistant` explicitly or raise assistant_ratio.")
    assistant = assistant_step(student, cost)
    return pair_kwargs(model, model_kwargs, student / WIDTH_STEPS, assistant / WIDTH_STEPS, target_shape)


__all__ = ["build_network", "build_pair", "count_flops", "count_params", "derive_pair", "pair_cost", "pair_kwargs",
           "PairCost"]

