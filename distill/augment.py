"""Batched, on-device augmentation: inception crops, flips and mixup for a whole batch at once.

Beyer et al. (2022) augment every training image with an inception crop and a flip and then mix the
batch; doing that per sample in PIL/torchvision transforms would starve a GPU at the batch sizes and
epoch counts of the paper. Here the random draws are a few numbers per image (made on the CPU with an
explicit ``torch.Generator``, so they are identical on every device type), and the pixels are moved by
a few tensor operations for the whole batch (:func:`crop_resize`: separable bilinear resampling as
batched gathers on a GPU, as interpolation-matrix products on the CPU, mixup in the same pass), on
whatever device the batch is on.

All functions are pure: the randomness comes only from the ``generator`` argument. A caller that
seeds the generator from ``(global seed, epoch, batch, rank)`` (see
:func:`batch_generator`) gets the same crops after a resume, and different crops on different DDP
ranks.

Official code: big_vision ``pp/ops_image.py`` (``inception_crop``: TF's ``sample_distorted_bounding_box``
with area 0.05–1, aspect 0.75–1.33, 100 attempts, whole image as fallback; ``flip_lr``) and ``utils.py`` (``mixup``:
one ``a ~ Beta(p, p)`` per batch, ``a = max(a, 1 − a)``, partner = the batch rolled by one).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: big_vision's ``inception_crop(area_min=5)`` through TF's ``sample_distorted_bounding_box`` defaults
#: (aspect ratio 0.75–1.33, 100 attempts); torchvision's RandomResizedCrop uses area 0.08–1, ratio 3/4–4/3.
INCEPTION_SCALE = (0.05, 1.0)
INCEPTION_RATIO = (0.75, 1.33)
INCEPTION_ATTEMPTS = 100


def batch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers such as ``(seed, epoch, batch_idx, rank)``.

    ``numpy.random.SeedSequence`` mixes the keys, so neighbouring steps or ranks get unrelated streams.
    """
    keys = [int(k) % 2**63 for k in keys]
    # SeedSequence turns a list of ints into 32-bit words in Python (~15 µs of a training step); keys
    # below 2**32 are one word each, so an array of them is the same entropy, taken as it is.
    entropy = np.array(keys, dtype=np.uint32) if max(keys, default=0) < 2**32 else keys
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_inception_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: Sequence[float] = INCEPTION_SCALE,
    ratio: Sequence[float] = INCEPTION_RATIO,
    attempts: int = INCEPTION_ATTEMPTS,
) -> Tensor:
    """Per-sample random crop boxes ``[batch, 4]`` as ``(x1, y1, x2, y2)`` in whole pixels (float, CPU).

    The official code's inception crop: big_vision's ``inception_crop`` is TF's
    ``sample_distorted_bounding_box`` with no object boxes, and this follows that op's sampler
    (``GenerateRandomCrop``) candidate by candidate: the aspect ratio ``w/h`` is uniform in ``ratio``,
    the height a uniform integer between the heights that give the smallest and largest area of
    ``scale`` at that ratio (capped so the box fits), the width ``round(h·ratio)``, nudged by one pixel
    where rounding leaves the area range; the first of ``attempts`` candidates that fits is taken,
    otherwise the whole image, and its offset is a uniform integer. The defaults are that op's as
    big_vision calls it: area 5–100 % (``area_min=5``), ratio 0.75–1.33, 100 attempts.
    (torchvision's ``RandomResizedCrop`` instead draws the area uniformly and the ratio log-uniformly,
    continuous, in 10 attempts.) Only the random stream differs from TF's: every candidate's numbers
    are drawn at once, for the whole batch.
    """
    min_area = torch.tensor(scale[0] * height * width, dtype=torch.float32)
    max_area = torch.tensor(scale[1] * height * width, dtype=torch.float32)
    draws = torch.rand(batch, attempts, 2, generator=generator)
    aspect = ratio[0] + draws[..., 0] * (ratio[1] - ratio[0])
    lowest = (min_area / aspect).sqrt().round()
    highest = (max_area / aspect).sqrt().round()
    # the tallest box whose rounded width still fits the image: (W + ½)/ratio, one less if rounding disagrees
    capped = ((width + 0.5 - 1e-7) / aspect).floor()
    capped = torch.where((capped * aspect).round() > width, capped - 1, capped)
    highest = torch.where((highest * aspect).round() > width, capped, highest).clamp(max=height)
    lowest = torch.minimum(lowest, highest)
    h = lowest + (draws[..., 1] * (highest - lowest + 1)).floor().clamp(max=highest - lowest)
    w = (h * aspect).round()
    too_small = w * h < min_area  # rounding: try one pixel taller, then one shorter
    h = torch.where(too_small, h + 1, h)
    w = torch.where(too_small, (h * aspect).round(), w)
    too_large = w * h > max_area
    h = torch.where(too_large, h - 1, h)
    w = torch.where(too_large, (h * aspect).round(), w)
    area = w * h
    fits = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first candidate that fits (0 if none)
    found = fits.any(dim=1)
    rows = torch.arange(batch)
    w = torch.where(found, w[rows, first], torch.full((batch,), float(width)))
    h = torch.where(found, h[rows, first], torch.full((batch,), float(height)))
    offsets = torch.rand(batch, 2, generator=generator)
    x1 = (offsets[:, 0] * (width - w)).floor()  # uniform in {0, …, W − w − 1}; 0 for the whole width
    y1 = (offsets[:, 1] * (height - h)).floor()
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def central_boxes(batch: int, height: int, width: int, fraction: float = 1.0) -> Tensor:
    """Boxes of the central ``fraction`` of each side (1.0 = the whole image), ``[batch, 4]``."""
    w, h = width * fraction, height * fraction
    box = torch.tensor([(width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2])
    return box.expand(batch, 4).clone()


def crop_resize(images: Tensor, boxes: Tensor, size: int, flips: Tensor | None = None,
                mix: float | None = None) -> Tensor:
    """Crop every image to its box, resize it to ``size`` × ``size`` and mirror it where ``flips``.

    Bilinear sampling at half-pixel centres without anti-aliasing, which is what the official code's
    ``inception_crop`` does (TF's ``tf.image.resize`` bilinear, ``antialias=False``); a box of the whole
    image at the image's own size returns the image exactly. One difference from slicing first: the
    outermost output pixels of a box inside the image interpolate towards the pixels just outside the
    box instead of clamping at its edge (source positions are clamped to the image, as
    ``grid_sample(..., padding_mode="border", align_corners=False)`` does). Boxes are continuous.

    Bilinear resampling is separable: rows are blended, then columns, with the two taps and weights
    of every output computed once per image (in float64, so the result agrees with an exact float64
    resampling to about 1e-5 of the pixel range). How the passes run depends on where the batch is:
    on a GPU as batched gathers (two source rows, then two columns per output); on the CPU as
    matrix products with the interpolation matrices, for the whole batch at once when the images are
    small, else image by image with banded matrices, so that each block of outputs reads only a
    narrow window of the source (see ``benchmarks/augment.py``), and as gathers there too where
    float32 products may run in bfloat16. uint8 images are converted to float only after the pixels
    are picked.

    ``mix``: a mixup coefficient ``a``; the result is then :func:`mix` of the crops with ``a``, done
    while the crops are produced (on the CPU for large images without a second pass over the batch).
    Any image dtype; the result is float32.
    """
    batch, _, height, width = images.shape
    boxes = boxes.detach().to("cpu", torch.float64)
    rows = _source_positions(boxes[:, 1], boxes[:, 3], size, height)
    columns = _source_positions(boxes[:, 0], boxes[:, 2], size, width)
    if flips is not None:
        flips = flips.detach().to("cpu", torch.bool)
    if images.device.type != "cpu" or not _exact_float32_matmul():
        return _crop_resize_gathered(images, rows, columns, size, flips, mix)
    if size * height * (width + size) <= _DENSE_LIMIT:
        return _crop_resize_dense(images, rows, columns, size, flips, mix)
    return _crop_resize_banded(images, rows, columns, size, flips, mix)


# Multiply-adds per image and channel of the dense products up to which they beat the banded ones on
# the CPU: their cost grows with the size cubed, the banded ones' mostly with the number of images
# (about 64 px → 64 px, one thread, measured on the development machine).
_DENSE_LIMIT = 64 * 64 * 128


def _exact_float32_matmul() -> bool:
    """Whether CPU float32 matrix products run in float32: a user may let them run in bfloat16
    (``torch.set_float32_matmul_precision("medium")``), which is far too coarse for pixel values."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None:
        return setting in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"


def _source_positions(low: Tensor, high: Tensor, size: int, extent: int) -> Tensor:
    """``[batch, size]`` float64 source coordinates of the output pixel centres, clamped to the image."""
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    # dividing last keeps whole-pixel positions exact (a whole-image box at the image's own size)
    positions = low[:, None] + (high - low)[:, None] * centres / size - 0.5
    return positions.clamp(0, extent - 1)


def _taps(positions: Tensor, extent: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The two source indices around each position and the weight of the second one (float32);
    ``extent``: the image's size along the axis, or a column of them, one per row of ``positions``."""
    first = positions.floor()
    weight = (positions - first).float()
    first = first.long()
    return first, (first + 1).clamp(max=extent - 1), weight


def _block_size(size: int) -> int:
    """Output columns per band block: a divisor of ``size`` near 16, or ``size`` when there is none."""
    divisors = [d for d in range(8, 33) if size % d == 0]
    return min(divisors, key=lambda d: abs(d - 16)) if divisors else size


def _windows(first_taps: Tensor, second_taps: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Regular source windows for blocks of ``block`` outputs: in image i, block k reads ``length[i]``
    source pixels from ``start[i] + k · step[i]``, which covers both taps of all its outputs.

    A strided view can only express windows that advance by a constant step; the step is whichever
    of the two integers around the average advance needs the shorter windows.
    """
    batch, size = first_taps.shape
    blocks = size // block
    lowest = first_taps.view(batch, blocks, block)[:, :, 0]
    highest = second_taps.view(batch, blocks, block)[:, :, -1]
    k = torch.arange(blocks)
    floor = (lowest[:, -1] - lowest[:, 0]) // max(blocks - 1, 1)
    steps = torch.stack([floor, floor + 1], dim=1)  # [batch, 2]
    shifted = k * steps[:, :, None]
    starts = (lowest[:, None, :] - shifted).amin(dim=2)
    lengths = (highest[:, None, :] - shifted).amax(dim=2) - starts + 1
    best = lengths.argmin(dim=1, keepdim=True)
    return starts.gather(1, best)[:, 0], steps.gather(1, best)[:, 0], lengths.gather(1, best)[:, 0]


def _band(first_taps: Tensor, second_taps: Tensor, weight: Tensor, start: Tensor, step: Tensor, length: int,
          block: int) -> Tensor:
    """``[batch, blocks, length, block]``: the interpolation weights of each block's outputs over its window."""
    batch, size = first_taps.shape
    blocks = size // block
    offsets = (start[:, None] + torch.arange(blocks) * step[:, None]).view(batch, blocks, 1, 1)
    shape = (batch, blocks, 1, block)
    band = torch.zeros(batch, blocks, length, block)
    band.scatter_(2, first_taps.view(shape) - offsets, (1 - weight).view(shape))
    # added, not written: both taps are the same pixel where a position is clamped to the last one
    band.scatter_add_(2, second_taps.view(shape) - offsets, weight.view(shape))
    return band


def _crop_resize_banded(images: Tensor, rows: Tensor, columns: Tensor, size: int, flips: Tensor | None,
                        mix: float | None) -> Tensor:
    # Both passes are matrix products with banded interpolation matrices, cut into blocks of outputs
    # that each read a narrow window of the source (a strided view, no copy). Per image, the source
    # rows and columns that the windows cover are converted to float once, channels interleaved so
    # that one product blends the rows of all channels, then a second one blends the columns. The
    # loop body runs once per image, so its views are made with as_strided (indexing costs more) and
    # its buffers are allocated once.
    batch, channels, height, width = images.shape
    block = _block_size(size)
    blocks = size // block
    if flips is not None:
        # a mirrored image sampled at mirrored positions, so that windows always advance rightwards
        columns = torch.where(flips[:, None], (width - 1) - columns.flip(1), columns)
    mirrored = flips.tolist() if flips is not None else [False] * batch
    # the rows and the columns of all images are planned together: half as many small operations,
    # which cost about as much as the products of a few images
    extents = torch.tensor([height, width]).repeat_interleave(batch)[:, None]
    first, second, weight = _taps(torch.cat([rows, columns]), extents)
    start, step, length = _windows(first, second, block)
    longest = int(length.max())
    bands = _band(first, second, weight, start, step, longest, block)
    span = (blocks - 1) * step + length
    row_span, column_span = span[:batch], span[batch:]

    # each image lays its region out with its own row pitch
    source = torch.zeros(int((row_span * column_span).max()) * channels)
    floating = images.is_floating_point()
    blended = torch.empty(int(column_span.max()) * size * channels)
    # Crops as [row, channel, column]: the column product writes its blocks of output columns into a
    # strided view of that layout (which the library then computes block by block rather than as one
    # batch, about 10 µs more per image at 160 → 128 px), so that mixing or copying a crop into the
    # result moves runs of ``size`` contiguous pixels; from the product's own layout, runs of
    # ``block`` pixels, that pass took about 20 µs longer.
    crops = [torch.empty(size, channels, size) for _ in range(3)]
    crop_blocks = [c.as_strided((blocks, size * channels, block), (block, size, 1)) for c in crops]
    out = _empty_float32((batch, channels, size, size))
    targets = out.transpose(1, 2).unbind(0)
    # per image: start, span, step and window length of its rows, then the same of its columns
    plan = torch.stack([start, span, step, length]).view(4, 2, batch).permute(2, 1, 0).reshape(batch, 8).tolist()
    image_stride, channel_stride, row_stride, column_stride = images.stride()
    image_offset = images.storage_offset()

    def crop(i: int, into: int) -> Tensor:
        """Image i's crop into ``crops[into]``."""
        y0, span_rows, y_step, y_length, x0, span_columns, x_step, x_length = plan[i]
        pitch = channels * span_columns
        top, bottom = max(-y0, 0), min(height - y0, span_rows)
        left, right = max(-x0, 0), min(width - x0, span_columns)
        if floating and (top or left or bottom < span_rows or right < span_columns):
            # windows reaching past the image edge give the pixels there weight 0, and what the
            # buffer holds there is left from earlier images; integer pixels are finite, float ones
            # might not be (0 · inf is nan), so those parts are cleared
            region = source.as_strided((span_rows, pitch), (pitch, 1))
            region[:top].zero_()
            region[bottom:].zero_()
            region = source.as_strided((bottom - top, channels, span_columns), (pitch, span_columns, 1),
                                       top * pitch)
            region[:, :, :left].zero_()
            region[:, :, right:].zero_()
        first_column = width - x0 - right if mirrored[i] else x0 + left
        pixels = images.as_strided((bottom - top, channels, right - left),
                                   (row_stride, channel_stride, column_stride),
                                   image_offset + i * image_stride + (y0 + top) * row_stride
                                   + first_column * column_stride)
        if mirrored[i]:
            pixels = pixels.flip(-1)
        source.as_strided((bottom - top, channels, right - left), (pitch, span_columns, 1),
                          top * pitch + left).copy_(pixels)
        torch.bmm(bands.as_strided((blocks, block, y_length), (longest * block, 1, block), i * size * longest),
                  source.as_strided((blocks, y_length, pitch), (y_step * pitch, pitch, 1)),
                  out=blended.as_strided((blocks, block, pitch), (block * pitch, pitch, 1)))
        torch.bmm(blended.as_strided((blocks, size * channels, x_length), (x_step, span_columns, 1)),
                  bands.as_strided((blocks, x_length, block), (longest * block, block, 1),
                                   (batch + i) * size * longest),
                  out=crop_blocks[into])
        return crops[into]

    if mix is None:
        for i in range(batch):
            targets[i].copy_(crop(i, 0))
        return out
    # each crop is blended with the previous one while both are still in the cache
    previous = final = crop(batch - 1, 2)
    for i in range(batch):
        current = final if i == batch - 1 else crop(i, i % 2)
        torch.lerp(previous, current, mix, out=targets[i])
        previous = current
    return out


def _interpolation_matrix(positions: Tensor, extent: int) -> Tensor:
    """``[batch, extent, size]``: column j holds the two bilinear weights of output j (one band block
    spanning the whole axis)."""
    first, second, weight = _taps(positions, extent)
    origin = torch.zeros(len(positions), dtype=torch.long)
    return _band(first, second, weight, origin, origin, extent, positions.shape[1])[:, 0]


def _crop_resize_dense(images: Tensor, rows: Tensor, columns: Tensor, size: int, flips: Tensor | None,
                       mix: float | None) -> Tensor:
    # Two products with the full interpolation matrices for the whole batch: for small images the
    # multiplications by zero cost less than handling the images one at a time.
    batch, channels, height, width = images.shape
    if flips is not None:
        columns = torch.where(flips[:, None], columns.flip(1), columns)
    blended = torch.bmm(images.reshape(batch, channels * height, width).float(),
                        _interpolation_matrix(columns, width))
    out = torch.matmul(_interpolation_matrix(rows, height).transpose(1, 2)[:, None],
                       blended.view(batch, channels, height, size))
    return out if mix is None else _mix_neighbours(out, mix)


def _crop_resize_gathered(images: Tensor, rows: Tensor, columns: Tensor, size: int, flips: Tensor | None,
                          mix: float | None) -> Tensor:
    # Element-wise gathers: two rows, then two columns per output. Few large kernels, which suits a
    # GPU; on the CPU a gather costs more per element than the matrix products do.
    batch, channels, height, width = images.shape
    device = images.device
    if flips is not None:
        columns = torch.where(flips[:, None], columns.flip(1), columns)
    top, bottom, row_weight = _taps(rows, height)
    left, right, column_weight = _taps(columns, width)
    # the plan goes to the device in two copies that do not wait for it: a blocking copy from host memory
    # waits for all the work queued on the device before it, every step
    top, bottom, left, right = torch.stack([top, bottom, left, right]).to(device, non_blocking=True).unbind(0)
    row_weight, column_weight = torch.stack([row_weight, column_weight]).to(device, non_blocking=True).unbind(0)
    planes = torch.arange(batch, device=device)[:, None] * channels + torch.arange(channels, device=device)
    planes = planes * height
    picks = planes[:, :, None] + torch.cat([top, bottom], dim=1)[:, None, :]
    pairs = torch.cat([left, right], dim=1)[:, None, None, :]
    flat = images.reshape(batch * channels * height, width)
    out = torch.empty(batch, channels, size, size, device=device)
    chunk = max(1, 2**26 // (channels * 2 * size * max(width, 2 * size)))  # bounds the float temporaries
    for s in range(0, batch, chunk):
        e = min(s + chunk, batch)
        picked = flat.index_select(0, picks[s:e].reshape(-1)).view(e - s, channels, 2 * size, width).float()
        blended = torch.lerp(picked[:, :, :size], picked[:, :, size:], row_weight[s:e, None, :, None])
        sampled = blended.gather(3, pairs[s:e].expand(e - s, channels, size, 2 * size))
        torch.lerp(sampled[..., :size], sampled[..., size:], column_weight[s:e, None, None, :], out=out[s:e])
    return out if mix is None else _mix_neighbours(out, mix)


def sample_flips(batch: int, generator: torch.Generator) -> Tensor:
    """A boolean mask ``[batch]``: which images to mirror (probability 1/2 each)."""
    return torch.rand(batch, generator=generator) < 0.5


def flip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the images where ``mask`` is true."""
    mask = mask.to(images.device, non_blocking=True).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(mask, images.flip(-1), images)


def sample_mixup(generator: torch.Generator, alpha: float = 1.0) -> float:
    """The batch's mixup coefficient: ``a ~ Beta(α, α)``, ``a = max(a, 1 − a)``, so ``a ∈ [0.5, 1]``.

    Beta(1, 1), the official setting, is the uniform distribution; other α draw from NumPy's Beta with
    a seed taken from ``generator`` (torch's Beta sampler takes no generator).
    """
    if alpha == 1.0:
        a = float(torch.rand((), generator=generator))
    else:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        a = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(a, 1.0 - a)


def mix(images: Tensor, a: float) -> Tensor:
    """``a · x + (1 − a) · roll(x, 1)``: each image mixed with its neighbour in the batch."""
    return _mix_neighbours(images, a)


def _empty_float32(shape: Sequence[int]) -> Tensor:
    # A new batch-sized CPU tensor spends about as long faulting its 4 KiB pages in as a crop takes
    # to compute; NumPy asks Linux for huge pages for large arrays (torch only with the environment
    # variable THP_MEM_ALLOC_ENABLE set), which cuts that to a few faults. Even then the kernel
    # zeroes every fresh page before it is written: at 160 → 128 px (one thread) writing the mixed
    # crops into a fresh batch took about 65 µs per image against 32 µs into memory written before,
    # so large batches reuse the memory of an earlier result once nothing refers to it any more
    # (crop_resize with mixup, batch 256: about 193 → 158 µs per image). The price: up to
    # _SPARE_SHAPES batch-sized buffers per thread stay allocated (50 MB each at that size).
    shape = tuple(shape)
    if math.prod(shape) * 4 < _REUSE_FROM_BYTES:
        return torch.from_numpy(np.empty(shape, np.float32))
    spares = _spares.__dict__.setdefault("by_shape", {})
    base, user = spares.pop(shape, (None, None))
    if base is None or user() is not None:
        base = np.empty(shape, np.float32)
    # the tensor keeps ``array`` alive, and so does every view, NumPy array or storage made from it:
    # while the weak reference lives, someone may still read the memory
    array = base.view()
    spares[shape] = base, weakref.ref(array)
    while len(spares) > _SPARE_SHAPES:
        del spares[next(iter(spares))]  # the least recently asked for
    return torch.from_numpy(array)


# Per thread (two threads must never be handed the same memory): for each of the last few shapes
# (a student's and a teacher's view), one buffer and a weak reference to its last user.
_spares = threading.local()
_SPARE_SHAPES = 2
_REUSE_FROM_BYTES = 4 << 20  # where NumPy starts asking for huge pages; smaller ones fault little


def _mix_neighbours(images: Tensor, a: float) -> Tensor:
    # one pass into one new tensor; the rolled copy and three temporaries of the plain formula cost
    # four times as much on a large batch
    if not images.is_floating_point():
        images = images.float()
    out = _empty_float32(images.shape) if images.dtype == torch.float32 and images.device.type == "cpu" \
        else torch.empty_like(images)
    torch.lerp(images[-1:], images[:1], a, out=out[:1])
    torch.lerp(images[:-1], images[1:], a, out=out[1:])
    return out


def mixup(images: Tensor, generator: torch.Generator, alpha: float = 1.0) -> tuple[Tensor, float]:
    """Mixup as in big_vision: one coefficient per batch (see :func:`sample_mixup`), partner = roll by one.

    Returns ``(mixed images, a)``. To feed a second view (the teacher's, at another resolution) the
    identical mixture, apply :func:`mix` to it with the same ``a``.
    """
    a = sample_mixup(generator, alpha)
    return mix(images, a), a


__all__ = [
    "INCEPTION_SCALE", "INCEPTION_RATIO", "batch_generator", "sample_inception_boxes", "central_boxes",
    "crop_resize", "sample_flips", "flip", "sample_mixup", "mix", "mixup",
]
