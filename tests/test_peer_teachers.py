"""Teachers published by RepDistiller / mdistiller (``{"model": state_dict}``) used as teachers here.

The shared files (``shared/data/peer-checkpoints/<arch>.pth``) hold random weights made with the peers'
own model code, a fixed input batch and the logits their model gives for it; they exist only on the
development machines, so those tests skip elsewhere. The converter tests below them need no shared files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.errors import CheckpointError
from distill.methods import BaselineKD
from distill.models import create_model
from distill.models.peers import convert_peer_state_dict
from distill.teachers import load_network


def shared_data() -> Path | None:
    for root in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (root / "peer-checkpoints").is_dir():
            return root
    return None


PEER_FILES = sorted((shared_data() or Path("/nonexistent")).glob("peer-checkpoints/*.pth"))
EXPECTED_ARCHS = {"resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
                  "wrn_16_2", "wrn_40_2"}
CIFAR100 = dict(num_classes=100, in_channels=3, image_size=32)


def assert_logits_match(logits: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal to 1e-5 of the logits' scale.

    The files' BatchNorm statistics are random, so activations grow with depth: resnet110's logits reach
    3.5e10 while resnet8's stay near 1. A float32 forward pass reproduces each logit only up to round-off
    of the order 1e-7 × the largest activations, and entries near zero are differences of huge terms,
    so a per-entry relative tolerance would be meaningless for them. The bound is therefore
    |Δ| ≤ 1e-5 · max(1, max |reference|) for every entry (an absolute 1e-5 for the nets with O(1)
    logits); the conversions here are at about 3e-7 of that scale on CPU.
    """
    scale = max(1.0, reference.abs().max().item())
    torch.testing.assert_close(logits, reference, rtol=0.0, atol=1e-5 * scale)


def test_all_published_architectures_are_present():
    if shared_data() is None:
        pytest.skip("shared peer checkpoints not available on this machine")
    assert {p.stem for p in PEER_FILES} == EXPECTED_ARCHS


@pytest.mark.skipif(not PEER_FILES, reason="shared peer checkpoints not available on this machine")
@pytest.mark.parametrize("path", PEER_FILES, ids=[p.stem for p in PEER_FILES])
def test_peer_checkpoint_as_teacher_reproduces_logits(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "input", "logits"} <= set(checkpoint)  # extra keys beside the weights
    arch = path.stem

    loaded = load_network(path, arch, **CIFAR100)
    with torch.no_grad():
        assert_logits_match(loaded.network.eval()(checkpoint["input"]), checkpoint["logits"])

    # the way a user does it: point `teacher` at the downloaded file
    method = BaselineKD(student="resnet8", teacher=str(path), teacher_model=arch, **CIFAR100)
    method.train()  # the teacher must stay in eval mode (BatchNorm running statistics)
    assert not method.teacher.training
    assert_logits_match(method.teacher_logits(checkpoint["input"]), checkpoint["logits"])
    assert method.teacher_info["path"] == str(path) and len(method.teacher_info["sha256"]) == 64


# ----------------------------------------------------------------------------- no shared files needed
def peer_style_network(arch: str = "resnet8", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = create_model(arch, **CIFAR100)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def test_checkpoint_with_extra_entries_loads_as_teacher(tmp_path):
    network = peer_style_network()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = network(images)
    path = tmp_path / "resnet8.pth"
    torch.save({"model": network.state_dict(), "input": images, "logits": logits, "epoch": 240}, path)
    loaded = load_network(path, "resnet8", **CIFAR100)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network.eval()(images), logits, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="does not fit model 'resnet20'"):
        load_network(path, "resnet20", **CIFAR100)


def test_converter_strips_dataparallel_prefix(tmp_path):
    network = peer_style_network("wrn_16_2")
    path = tmp_path / "ckpt_epoch_240.pth"
    # what `torch.save({"model": nn.DataParallel(net).state_dict()}, ...)` writes
    torch.save({"model": {"module." + k: v for k, v in network.state_dict().items()}, "epoch": 240}, path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    fresh = create_model("wrn_16_2", **CIFAR100).eval()
    fresh.load_state_dict(convert_peer_state_dict("wrn_16_2", checkpoint), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), network(images), rtol=0, atol=1e-6)


def test_load_network_accepts_dataparallel_prefix(tmp_path):
    network = peer_style_network()
    path = tmp_path / "resnet8.pth"
    torch.save({"model": {"module." + k: v for k, v in network.state_dict().items()}}, path)
    loaded = load_network(path, "resnet8", **CIFAR100)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network.eval()(images), network(images), rtol=0, atol=1e-6)
