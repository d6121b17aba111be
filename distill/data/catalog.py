"""The data sets by name, and name lookup with suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from distill.data.base import Source
from distill.data.folders import ImageFolderSource, ImageNetSource
from distill.data.memory import Fake, Mnist5k
from distill.data.tvsets import Cifar10, Cifar100, Flowers102, Food101, OxfordPets, Sun397
from distill.errors import UnknownNameError

SOURCES: dict[str, type[Source]] = {
    source.name: source
    for source in (Mnist5k, Fake, Cifar10, Cifar100, ImageFolderSource, ImageNetSource,
                   Flowers102, OxfordPets, Food101, Sun397)
}


def lookup(kind: str, name: str, known: Iterable[str], option: str) -> str:
    """``name`` if it is in ``known``, else UnknownNameError suggesting the closest known names."""
    known = list(known)
    if name in known:
        return name
    lowered = str(name).strip().lower()
    close = difflib.get_close_matches(lowered, known, n=3, cutoff=0.5)
    if not close and len(lowered) >= 3:  # a prefix ("imag") may score low by ratio yet be obvious
        close = [candidate for candidate in known if candidate.startswith(lowered[:4])][:3]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownNameError(f"unknown {kind} {name!r} for {option}; {hint}choose one of: {', '.join(known)}.")
