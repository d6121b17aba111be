"""Accuracy under adversarial examples: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018).

Gao et al. (ResidualKD) claim that S+A stays robust to adversarial samples; these functions measure
that for any trained network, so that students of different methods can be compared.

**Units.** The networks here see normalised images ``(pixel − mean) / std`` with pixels in [0, 1].
ε is given in **pixel units** (an L∞ ball of radius ε in [0, 1] pixel space, e.g. 8/255), the usual
convention. The attacks work on the normalised tensors: a pixel step of ε is ``ε / std`` per channel,
and the perturbed image is clipped to the valid pixel range ``[(0 − mean)/std, (1 − mean)/std]``.

* ``fgsm``: ``x' = clip(x + ε·sign(∇_x CE))`` (one step, untargeted).
* ``pgd``: ``steps`` steps of size ``step_size`` (default ``2.5·ε/steps``, Madry et al.) from a uniform
  random start in the ε-ball, each projected back onto the ball and the pixel range.

Both use the network in eval mode and the true labels; they return the perturbed (normalised) images.

    distill robustness --model runs/mnist5k/residual/version_0/model.safetensors --dataset mnist5k \\
        --eps 0 0.05 0.1 0.2 --attacks fgsm pgd --out robustness.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError

ATTACKS = ("fgsm", "pgd")


def _per_channel(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _bounds(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel lower and upper bounds of valid normalised images, and 1/std (pixel → normalised)."""
    m, s = _per_channel(mean, images), _per_channel(std, images)
    return (0 - m) / s, (1 - m) / s, 1 / s


def _input_gradient(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(images).float(), labels)
        (grad,) = torch.autograd.grad(loss, images)
    return grad


def fgsm(model: nn.Module, images: Tensor, labels: Tensor, eps: float,
         mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """One signed-gradient step of ε (pixel units) on normalised ``images``, clipped to valid pixels."""
    if eps == 0:
        return images.detach()
    low, high, scale = _bounds(images, mean, std)
    adversarial = images.detach() + eps * scale * _input_gradient(model, images, labels).sign()
    return torch.maximum(torch.minimum(adversarial, high), low)


def pgd(model: nn.Module, images: Tensor, labels: Tensor, eps: float, mean: Sequence[float], std: Sequence[float],
        steps: int = 10, step_size: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent in the L∞ ε-ball (pixel units), random start, ``steps`` signed steps."""
    if eps == 0:
        return images.detach()
    low, high, scale = _bounds(images, mean, std)
    step = (2.5 * eps / steps if step_size is None else step_size) * scale
    radius = eps * scale
    clean = images.detach()
    noise = torch.rand(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device) * 2 - 1
    adversarial = torch.maximum(torch.minimum(clean + noise * radius, high), low)
    for _ in range(steps):
        adversarial = adversarial + step * _input_gradient(model, adversarial, labels).sign()
        adversarial = torch.maximum(torch.minimum(adversarial, clean + radius), clean - radius)
        adversarial = torch.maximum(torch.minimum(adversarial, high), low)
    return adversarial.detach()


def robust_accuracy(model: nn.Module, batches: Iterable[Any], epsilons: Sequence[float], mean: Sequence[float],
                    std: Sequence[float], attacks: Sequence[str] = ATTACKS, pgd_steps: int = 10,
                    seed: int = 0, device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` on ``batches`` (``(images, labels, ...)``) under each attack and ε.

    Returns ``{attack: {str(ε): accuracy}}``; ε = 0 is the clean accuracy.
    """
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ConfigError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    if any(e < 0 or e > 1 for e in epsilons):
        raise ConfigError(f"ε is in pixel units of [0, 1] images (e.g. 8/255 ≈ 0.031); got {list(epsilons)}")
    model = model.eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    correct = {a: [0] * len(epsilons) for a in attacks}
    total = 0
    for batch in batches:
        images, labels = batch[0].to(device), batch[1].to(device)
        total += labels.numel()
        for attack in attacks:
            for index, eps in enumerate(epsilons):
                if attack == "fgsm":
                    adversarial = fgsm(model, images, labels, eps, mean, std)
                else:
                    adversarial = pgd(model, images, labels, eps, mean, std, steps=pgd_steps, generator=generator)
                with torch.no_grad():
                    correct[attack][index] += int((model(adversarial).argmax(-1) == labels).sum())
    return {a: {str(eps): correct[a][i] / max(total, 1) for i, eps in enumerate(epsilons)} for a in attacks}


# ------------------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from distill.data import DistillDataModule
    from distill.teachers import load_network

    parser = argparse.ArgumentParser(
        prog="distill robustness",
        description="Accuracy of a trained network (any run's model.safetensors, or a .ckpt) under FGSM and PGD.")
    parser.add_argument("--model", required=True, help="network file (model.safetensors of any run, or a .ckpt)")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--data-kwargs", type=json.loads, default={},
                        help='more DistillDataModule options as JSON, e.g. \'{"val_fraction": 0.1}\'')
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 2 / 255, 4 / 255, 8 / 255],
                        help="L∞ radii in [0, 1] pixel units (default 0 2/255 4/255 8/255)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only N images of the split, a random subset drawn with --seed")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of PGD's random start and of --limit's subset")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    data = DistillDataModule(**{**args.data_kwargs, "dataset": args.dataset, "data_dir": args.data_dir,
                                "image_size": args.image_size, "batch_size": args.batch_size})
    network = load_network(args.model, None, data.num_classes, data.in_channels, data.image_size).network

    loader = data.eval_dataloader(args.split)
    keep = None
    if args.limit is not None and args.limit < len(loader.dataset):
        # a seeded random subset: splits are stored in class order, so the first N would be a few classes
        order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(args.seed))
        keep = torch.zeros(len(loader.dataset), dtype=torch.bool)
        keep[order[: args.limit]] = True

    def batches() -> Iterable[Any]:
        for images, labels, indices in loader:
            mask = keep[indices] if keep is not None else torch.ones(len(labels), dtype=torch.bool)
            if mask.any():
                yield images[mask], labels[mask]

    accuracy = robust_accuracy(network, batches(), args.eps, data.mean, data.std, args.attacks, args.pgd_steps,
                               args.seed, args.device)
    result = {"model": args.model, "dataset": args.dataset, "split": args.split, "limit": args.limit,
              "eps_units": "pixels in [0, 1]", "pgd_steps": args.pgd_steps, "accuracy": accuracy}
    print("| attack | " + " | ".join(f"ε={e:.4g}" for e in args.eps) + " |")
    print("|---|" + "---|" * len(args.eps))
    for attack, row in accuracy.items():
        print(f"| {attack} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


__all__ = ["fgsm", "pgd", "robust_accuracy", "ATTACKS"]

if __name__ == "__main__":
    main()
