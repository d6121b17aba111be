"""Name → builder registry of the model zoo, and :func:`create_model`.

A builder is a function ``builder(num_classes, in_channels=3, image_size=None, **options)`` that
returns a :class:`~distill.models.base.ClassifierModel`. :func:`register_model` adds one under its
function name (timm's convention) or an explicit ``name``.

Besides the registered zoo, ``create_model`` understands two prefixes that are not listed one by one
(there are thousands of names):

* ``tv.<name>``: any torchvision classification model (``torchvision.models.list_models(module=
  torchvision.models)``), see :mod:`distill.models.external`;
* ``timm.<name>``: any timm model, when timm is installed.

``list_models("tv.*")`` and ``list_models("timm.*")`` list those on request.

This module knows no family: the families register with it (``@register_model``, and
:func:`register_source` for a whole prefix), so every arrow goes from a family to the registry.
:mod:`distill.models` imports them all, so importing the package registers everything.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from torch import nn

from distill.errors import ConfigError, UnknownNameError
from distill.models.base import ClassifierModel

Builder = Callable[..., ClassifierModel]
B = TypeVar("B", bound=Builder)
#: ``create(name_without_prefix, num_classes, in_channels, image_size, pretrained, **options)``.
SourceBuilder = Callable[..., ClassifierModel]

_REGISTRY: dict[str, Builder] = {}
# Arguments create_model passes to every builder itself; they are not "options".
_COMMON_ARGS = ("num_classes", "in_channels", "image_size")
EXTERNAL_PREFIXES = ("tv.", "timm.")
# Prefix → (create, names): the families not listed one by one, registered by distill.models.external.
_SOURCES: dict[str, tuple[SourceBuilder, Callable[[], list[str]]]] = {}


@overload
def register_model(fn: B) -> B: ...
@overload
def register_model(fn: None = None, *, name: str | None = None) -> Callable[[B], B]: ...


def register_model(fn: Builder | None = None, *, name: str | None = None) -> Any:
    """Registers a builder, as ``@register_model`` or ``@register_model(name="...")``."""

    def add(builder: B) -> B:
        key = name or builder.__name__
        if key.startswith(EXTERNAL_PREFIXES):
            raise ValueError(f"model names starting with {EXTERNAL_PREFIXES} are reserved: {key!r}")
        if key in _REGISTRY and _REGISTRY[key] is not builder:
            raise ValueError(f"model {key!r} is already registered (by {_REGISTRY[key].__module__})")
        _REGISTRY[key] = builder
        return builder

    return add(fn) if fn is not None else add


def register_source(prefix: str, create: SourceBuilder, names: Callable[[], list[str]]) -> None:
    """Routes every model name starting with ``prefix`` (e.g. ``"tv."``) to ``create``.

    ``create(name, num_classes, in_channels, image_size, pretrained, **options)`` gets the name without
    the prefix; ``names()`` lists the names it knows (without the prefix) for :func:`list_models`.
    """
    if prefix not in EXTERNAL_PREFIXES:
        raise ValueError(f"model name prefixes are {EXTERNAL_PREFIXES}, got {prefix!r}")
    if prefix in _SOURCES and _SOURCES[prefix][0] is not create:
        raise ValueError(f"model prefix {prefix!r} is already registered (by {_SOURCES[prefix][0].__module__})")
    _SOURCES[prefix] = (create, names)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered zoo, optionally filtered by an fnmatch ``pattern``.

    External models are listed only when the pattern asks for them: ``"tv.*"`` (or e.g.
    ``"tv.resnet*"``) lists torchvision models, ``"timm.*"`` timm models (empty without timm).
    """
    names = sorted(_REGISTRY)
    prefix = _source_prefix(pattern) if pattern is not None else None
    if prefix is not None:
        names = [prefix + n for n in _SOURCES[prefix][1]()]
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _source_prefix(name: str) -> str | None:
    return next((prefix for prefix in _SOURCES if name.startswith(prefix)), None)


def unknown_name_error(name: str, candidates: list[str], what: str = "model") -> UnknownNameError:
    """An :class:`UnknownNameError` whose one-line message suggests the closest names."""
    lowered = {c.lower(): c for c in candidates}
    close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=4, cutoff=0.6)]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(
        f"unknown {what} {name!r}.{hint} distill.models.list_models() lists all registered names "
        "(plus 'tv.<name>' for torchvision and 'timm.<name>' for timm models)."
    )


def _check_options(name: str, builder: Builder, options: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in _COMMON_ARGS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"its options are: {', '.join(accepted)}" if accepted else "it takes no extra options"
        raise ConfigError(f"model {name!r} got unknown argument(s) {', '.join(unknown)}; {takes}.")


def scale_widths(widths: Sequence[int], width: float) -> list[int]:
    """Channel counts multiplied by ``width`` (rounded, at least 1): the ``width`` option of the zoo's builders."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ConfigError(f"width must be a positive number (1 = the published widths), got {width!r}")
    return [max(1, round(int(c) * float(width))) for c in widths]


def imported_builder(path: str) -> Builder:
    """A network class (or function) named by its import path, ``"mypackage.models.MyNet"``, as a builder.

    It is called with ``num_classes`` and the model options (``student_kwargs``), and with ``in_channels`` and
    ``image_size`` where its signature takes them (or ``**kwargs``); it must return a ``torch.nn.Module`` that maps
    images to logits. Subclass :class:`~distill.models.base.ClassifierModel` (``forward_features`` and
    ``forward_head``) for ResidualKD and for :class:`~distill.callbacks.SpeedOptions`, which find networks by it.
    """
    module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model {path!r}: cannot import {module_name!r} ({err}); a model is a registered name "
                          "(distill.models.list_models()) or the import path of your own network class, with its "
                          "package on PYTHONPATH.") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise ConfigError(f"model {path!r}: {module_name} has no class or function {attribute!r}.")
    takes = inspect.signature(target).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())

    def build(num_classes: int, in_channels: int, image_size: int | None, **options: Any) -> nn.Module:
        sizes = {key: value for key, value in (("in_channels", in_channels), ("image_size", image_size))
                 if open_ended or key in takes}
        try:
            return target(num_classes=num_classes, **sizes, **options)
        except TypeError as err:  # an option the class does not take, or one it needs
            raise ConfigError(f"model {path!r}: {err}") from None

    return build


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds a network of the zoo (or ``tv.<name>``/``timm.<name>``, or your own class) by name.

    Args:
        name: a name from :func:`list_models`, ``tv.<torchvision name>``, ``timm.<timm name>``, or the import
            path of your own network class (:func:`imported_builder`).
        num_classes: size of the logits.
        in_channels: image channels (1 for grey-scale data).
        image_size: input resolution; required by the MLPs (their input layer depends on it), ignored
            by the convolutional zoo networks (they pool adaptively).
        pretrained: download pretrained weights; only for ``tv.*`` and ``timm.*`` models.
        **kwargs: options of the builder (e.g. ``drop_rate`` of the WRNs, ``hidden`` of ``mlp``).

    Raises:
        UnknownNameError: ``name`` is not registered (the message suggests close names).
        ConfigError: an option the builder does not take, or an invalid value.
        CheckpointError: pretrained weights could not be downloaded.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")

    prefix = _source_prefix(name)
    if prefix is not None:
        create = _SOURCES[prefix][0]
        model = create(name[len(prefix):], num_classes, in_channels, image_size, pretrained, **kwargs)
    else:
        builder = _REGISTRY.get(name)
        if builder is None and "." in name:
            builder = imported_builder(name)
        if builder is None:
            raise unknown_name_error(name, list(_REGISTRY))
        _check_options(name, builder, kwargs)
        if pretrained:
            raise ConfigError(
                f"model {name!r} has no downloadable pretrained weights (only tv.* and timm.* models "
                "have); train it first and load the checkpoint instead."
            )
        model = builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module.")
    model.model_name = name
    return model
