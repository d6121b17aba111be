"""Images/s of the batched on-device crop + flip + mixup against a per-sample torchvision pipeline.

    python benchmarks/augment.py                       # CPU, defaults below
    python benchmarks/augment.py --device cuda --batch 512 --repeats 20

Both pipelines take the same uint8 batch (what the DataModule's workers decode) and return the same
float32 batch of ``--out`` × ``--out`` crops: per sample, torchvision v2 ``RandomResizedCrop``
(scale and ratio of ``augment.INCEPTION_SCALE``/``INCEPTION_RATIO``, antialiased) + ``RandomHorizontalFlip``, then stack and
:func:`distill.augment.mixup` (the data-loader way); batched, :func:`distill.augment.crop_resize` with
the flips and the mixup done in the same pass (bilinear without anti-aliasing, as big_vision's
``inception_crop``; on the CPU interpolation-matrix products, for large images banded and image by
image). The two alternate, one timed run each per repeat after one warm-up; images/s are the
medians and the speed-up the median of the per-repeat ratios. Not a test: timings
depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import v2

from distill import augment


def per_sample(images: torch.Tensor, out: int, generator: torch.Generator) -> torch.Tensor:
    crop = v2.Compose([v2.RandomResizedCrop(out, scale=augment.INCEPTION_SCALE, ratio=augment.INCEPTION_RATIO,
                                            antialias=True), v2.RandomHorizontalFlip()])
    batch = torch.stack([crop(image) for image in images]).float()
    return augment.mixup(batch, generator)[0]


def batched(images: torch.Tensor, out: int, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    boxes = augment.sample_inception_boxes(b, h, w, generator)
    flips = augment.sample_flips(b, generator)
    return augment.crop_resize(images, boxes, out, flips, mix=augment.sample_mixup(generator))


def seconds(fn, images: torch.Tensor, out: int, generator: torch.Generator, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(images, out, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(images: torch.Tensor, on_device: torch.Tensor, out: int, repeats: int,
            device: torch.device) -> tuple[float, float, float]:
    """Images/s of each pipeline (medians) and the median of their ratio over the repeats. The two
    alternate, one timed run each per repeat, so that load changing on a shared machine falls on both."""
    slow_generator, fast_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    per_sample(images, out, slow_generator), batched(on_device, out, fast_generator)  # warm-up
    slow, fast = [], []
    for _ in range(repeats):
        slow.append(seconds(per_sample, images, out, slow_generator, torch.device("cpu")))
        fast.append(seconds(batched, on_device, out, fast_generator, device))
    ratio = statistics.median(s / f for s, f in zip(slow, fast))
    return len(images) / statistics.median(slow), len(images) / statistics.median(fast), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=160, help="side of the un-augmented input images")
    parser.add_argument("--out", type=int, default=128, help="side of the crops")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: one data-loader worker)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    # the per-sample pipeline runs where data loaders run (CPU); the batched one on the device
    slow, fast, ratio = compare(images, images.to(device), args.out, args.repeats, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"batch {args.batch}, {args.size} px -> {args.out} px crops, median of {args.repeats}")
    print("| pipeline | where | images/s |\n|---|---|---|")
    print(f"| per-sample torchvision v2 RandomResizedCrop + flip, stack, mixup | CPU, {args.threads} thread(s) | {slow:,.0f} |")
    print(f"| batched distill.augment.crop_resize, flip and mixup in the same pass | {name} | {fast:,.0f} |")
    print(f"speed-up: {ratio:.2f}x (median over the repeats of the per-repeat ratio)")


if __name__ == "__main__":
    main()
