"""Loading networks from files safely, and saving them so that any method can use them as a teacher.

Accepted teacher sources (see :func:`load_network`):

* a Lightning checkpoint (``.ckpt``) written by any method of this package: the architecture is read
  from its hyperparameters (``student``, ``student_kwargs``, ``num_classes``, ...);
* a ``.safetensors`` file written by :func:`save_network` (architecture in its metadata) or by anyone
  else (then ``model`` names the architecture);
* a plain PyTorch file (``.pt``/``.pth``/``.bin``) holding a state_dict, or a dict wrapping one under
  ``"state_dict"`` or ``"model"`` (the RepDistiller/mdistiller format); ``model`` names the
  architecture;
* no file, ``model`` plus ``pretrained=True``: torchvision or timm pretrained weights (``tv.resnet18``).

Every ``torch.load`` here uses ``weights_only=True``: a file that would need to unpickle arbitrary
Python objects is refused, so a checkpoint from a stranger cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from distill.errors import CheckpointError, ConfigError
from distill.models import create_model

PLAIN_SUFFIXES = (".pt", ".pth", ".bin")
#: Prefixes under which a method stores the trained network in its LightningModule state_dict.
NETWORK_PREFIX = "student."


@dataclass
class NetworkSpec:
    """Everything needed to rebuild a network of the zoo: its registry name and constructor arguments."""

    model: str
    num_classes: int
    in_channels: int = 3
    image_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return create_model(
            self.model,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            **self.model_kwargs,
        )


@dataclass
class LoadedNetwork:
    network: nn.Module
    spec: NetworkSpec
    path: str | None
    sha256: str | None

    def describe(self) -> dict[str, Any]:
        """What a run records about its teacher instead of the teacher's weights: the path as given, the file it
        named then (``resolved_path``: a ``latest`` link may move later) and the file's sha256."""
        resolved = str(Path(self.path).resolve()) if self.path and Path(self.path).is_file() else None
        return {"path": self.path, "resolved_path": resolved, "sha256": self.sha256, **asdict(self.spec)}


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_torch_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line :class:`CheckpointError` for every failure.

    A file whose pickle would create anything but tensors and plain containers (a ``__reduce__``
    payload calling ``os.system``, a pickled class) is refused before any of it runs.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch reports both refused content (code the file would run) and garbage as UnpicklingError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refused = next((line for line in lines if "unsupported global" in line.lower()), None)
        if refused is None:
            raise CheckpointError(f"cannot read {path}: not a valid PyTorch checkpoint (the file may be "
                                  "truncated or of another format; only weights-only files are read).") from None
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects that could execute code "
            f"({refused[:160]}). Use a .safetensors file, or a weights-only file from a source you trust "
            "(e.g. re-save only the tensors: torch.save(model.state_dict(), path))."
        ) from None
    except Exception as err:  # zip/EOF/format errors from a truncated or foreign file
        raise CheckpointError(
            f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}. "
            "Is the file complete and a PyTorch checkpoint?"
        ) from None


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _without_data_parallel_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from ``nn.DataParallel``/DDP carry ``module.`` before every key (peers' teachers do)."""
    if state and all(k.startswith("module.") for k in state):
        return _strip_prefix(state, "module.")
    return dict(state)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _spec_from_hparams(hparams: Mapping[str, Any], path: Path) -> NetworkSpec:
    if "student" not in hparams or "num_classes" not in hparams:
        raise CheckpointError(
            f"{path} is a Lightning checkpoint but not one of this package's methods (no 'student' and "
            "'num_classes' hyperparameters); export its network's state_dict and pass `teacher_model`."
        )
    return NetworkSpec(
        model=hparams["student"],
        num_classes=int(hparams["num_classes"]),
        in_channels=int(hparams.get("in_channels") or 3),
        image_size=hparams.get("image_size"),
        model_kwargs=dict(hparams.get("student_kwargs") or {}),
    )


def _read_file(path: Path, fallback: NetworkSpec | None) -> tuple[NetworkSpec, dict[str, torch.Tensor]]:
    """Returns the architecture and the network's state_dict stored in ``path``."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {err}. Is the file complete?") from None
        if "distill_spec" in metadata:
            return NetworkSpec(**json.loads(metadata["distill_spec"])), state
        return _require(fallback, path), state

    if path.suffix not in PLAIN_SUFFIXES + (".ckpt",):
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .ckpt, .safetensors or one of "
            f"{', '.join(PLAIN_SUFFIXES)}."
        )
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        spec = _spec_from_hparams(obj["hyper_parameters"], path)
        return spec, _strip_prefix(obj["state_dict"], NETWORK_PREFIX)
    if isinstance(obj, Mapping) and "distill_spec" in obj and "state_dict" in obj:
        return NetworkSpec(**obj["distill_spec"]), dict(obj["state_dict"])
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            return _require(fallback, path), _without_data_parallel_prefix(obj[key])
    if _is_state_dict(obj):
        return _require(fallback, path), _without_data_parallel_prefix(obj)
    raise CheckpointError(
        f"{path} holds no state_dict (expected a dict of tensors, or one under 'state_dict' or 'model')."
    )


def _require(spec: NetworkSpec | None, path: Path) -> NetworkSpec:
    if spec is None:
        raise ConfigError(
            f"{path} holds weights but not their architecture: set `teacher_model` to the model name "
            "(see distill.models.list_models())."
        )
    return spec


def load_network(
    path: str | Path | None,
    model: str | None,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
) -> LoadedNetwork:
    """Builds a network and loads its weights; every problem is a one-line :class:`CheckpointError`.

    ``num_classes`` is the number of classes of the data the network will be used on: a file trained
    for another number of classes is an error here, before any training starts.
    """
    fallback = None
    if model is not None:
        fallback = NetworkSpec(model, num_classes, in_channels, image_size, dict(model_kwargs or {}))
    if path is None:
        if fallback is None or not pretrained:
            raise ConfigError("no teacher given: set `teacher` to a checkpoint file, or `teacher_model` "
                              "with `teacher_pretrained: true` for torchvision/timm weights.")
        network = create_model(model, num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size, pretrained=True, **dict(model_kwargs or {}))
        return LoadedNetwork(network, fallback, None, None)

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist; check the path (train a teacher "
                              "first with `distill fit --model Supervised ...`).")
    spec, state = _read_file(path, fallback)
    if model is not None and spec.model != model:
        raise CheckpointError(f"{path} holds a {spec.model!r} network but `teacher_model` says {model!r}; "
                              "fix `teacher_model` or leave it out.")
    if spec.num_classes != num_classes:
        raise CheckpointError(
            f"{path} was trained for {spec.num_classes} classes but the data has {num_classes}; "
            "use a teacher trained on the same data set."
        )
    if spec.in_channels != in_channels:
        raise CheckpointError(
            f"{path} expects {spec.in_channels}-channel images but the data has {in_channels} channels."
        )
    network = spec.build()
    _load_strictly(network, state, f"{path} does not fit model {spec.model!r}")
    return LoadedNetwork(network, spec, str(path), sha256_of(path))


def _load_strictly(network: nn.Module, state: Mapping[str, torch.Tensor], misfit: str) -> None:
    """``state`` into ``network``, every key; a mismatch is one :class:`CheckpointError`, ``misfit`` + torch's detail."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{misfit}: {' '.join(str(err).split())[:300]}") from None


def load_weights_into(network: nn.Module, spec: NetworkSpec, path: str | Path) -> dict[str, str]:
    """Loads the weights of the network stored in ``path`` (a method's checkpoint: its student; a saved network)
    into ``network``, built from ``spec``; one :class:`CheckpointError` when the file holds another network.
    Returns ``{"path", "sha256"}`` of the file, to record."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"student_init {path} does not exist; give a run's checkpoint or model.safetensors.")
    stored, state = _read_file(path, fallback=spec)
    wanted = (spec.model, spec.num_classes, spec.in_channels, dict(spec.model_kwargs or {}))
    found = (stored.model, stored.num_classes, stored.in_channels, dict(stored.model_kwargs or {}))
    if found != wanted:
        raise CheckpointError(f"student_init {path} holds a {stored.model!r} network for {stored.num_classes} classes and "
                              f"{stored.in_channels} channels ({found[3] or 'no options'}); the student is {spec.model!r} "
                              f"for {spec.num_classes} and {spec.in_channels} ({wanted[3] or 'no options'}).")
    _load_strictly(network, state, f"student_init {path} does not fit the student {spec.model!r}")
    return {"path": str(path), "sha256": sha256_of(path)}


def save_network(network: nn.Module, spec: NetworkSpec, path: str | Path, **info: Any) -> Path:
    """Writes ``network`` as a ``.safetensors`` file that :func:`load_network` rebuilds by itself.

    The architecture (``spec``) and any ``info`` (e.g. the validation accuracy) go in the metadata,
    so the file is all a later run needs to use the network as its teacher. The file is written to a
    temporary name and renamed, so an interrupted save never leaves a truncated file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory; contiguous clones are always accepted
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}
    metadata = {"distill_spec": json.dumps(asdict(spec))}
    metadata.update({k: json.dumps(v) for k, v in info.items()})
    content = deterministic_safetensors(tensors, metadata)
    if path.is_file() and path.read_bytes() == content:
        return path  # unchanged (a finished run resumed again): its bytes, and so its sha256, stay
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    return path


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A ``.safetensors`` file's bytes, the same for the same tensors and metadata in every process.

    The safetensors writer keeps the metadata in a hash map whose order changes from process to process, so the same
    network saved twice had two sha256s, and a run distilled from it could no longer resume against it. The header
    is written again here with its keys sorted (the data and its offsets are the writer's; readers accept any order).
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return len(header).to_bytes(8, "little") + header + raw[8 + size:]
