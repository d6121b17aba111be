"""Tests of the model zoo (distill.models): interface contract, architectures, registry, externals."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.errors import CheckpointError, ConfigError, UnknownNameError
from distill.models import (
    ClassifierModel,
    convert_peer_state_dict,
    create_model,
    list_models,
    register_model,
)

ZOO = list_models()
MLPS = [n for n in ZOO if n.startswith("mlp")]
TAKD = [n for n in ZOO if n.startswith("takd_cnn")]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def check_contract(model: ClassifierModel, x: torch.Tensor, num_classes: int) -> None:
    """forward shape, forward == head(features[-1]) in eval mode, feature_channels consistent."""
    assert isinstance(model, ClassifierModel)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        from_head = model.forward_head(feats[-1])
        both, feats2 = model.forward_with_features(x)
    assert logits.shape == (x.shape[0], num_classes)
    assert model.num_classes == num_classes
    torch.testing.assert_close(from_head, logits)
    torch.testing.assert_close(both, logits)
    assert len(feats2) == len(feats) == len(model.feature_channels)
    widths = [f.shape[1] if f.dim() == 4 else f.shape[-1] for f in feats]
    assert widths == model.feature_channels


# ----------------------------------------------------------------------------- every zoo model
def test_zoo_lists_all_families():
    for name in ["resnet8", "resnet14", "resnet20", "resnet26", "resnet32", "resnet44", "resnet56", "resnet110",
                 "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "mlp", "mlp_1200_1200",
                 "mlp_800_800", "mlp_300_300", "mlp_30_30"]:
        assert name in ZOO
    for size in (2, 4, 6, 8, 10):
        assert f"takd_cnn{size}" in ZOO and f"takd_cnn{size}_c100" in ZOO
    assert ZOO == sorted(ZOO)
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


@pytest.mark.parametrize("num_classes,in_channels", [(10, 3), (100, 1), (10, 1), (100, 3)])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_contract(name, num_classes, in_channels):
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=32)
    assert model.model_name == name
    x = torch.randn(2, in_channels, 32, 32)
    check_contract(model, x, num_classes)
    model.train()
    assert model(x).shape == (2, num_classes)


@pytest.mark.parametrize("size", [64, 28])
@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "wrn_16_2", *TAKD])
def test_other_input_sizes(name, size):
    model = create_model(name, num_classes=10, in_channels=1)
    check_contract(model, torch.randn(2, 1, size, size), 10)


def test_mlp_at_mnist_size():
    model = create_model("mlp_800_800", num_classes=10, in_channels=1, image_size=28)
    check_contract(model, torch.randn(2, 1, 28, 28), 10)
    assert model.feature_channels == [800, 800]
    # 784-800-800-10, as in Hinton et al.
    assert n_params(model) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


def test_mlp_options_and_presets():
    teacher = create_model("mlp_1200_1200", num_classes=10, in_channels=1, image_size=28)
    rates = [m.p for m in teacher.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.2, 0.5, 0.5]  # input, hidden 1, hidden 2 (before the output layer)
    student = create_model("mlp_30_30", num_classes=10, in_channels=1, image_size=28)
    assert all(m.p == 0 for m in student.modules() if isinstance(m, nn.Dropout))
    custom = create_model("mlp", num_classes=5, in_channels=1, image_size=(4, 6), hidden=[7], dropout=0.1)
    check_contract(custom, torch.randn(3, 1, 4, 6), 5)
    assert custom.feature_channels == [7]
    logistic = create_model("mlp", num_classes=5, in_channels=1, image_size=4, hidden=())
    check_contract(logistic, torch.randn(3, 1, 4, 4), 5)
    with pytest.raises(ConfigError, match="image_size"):
        create_model("mlp_800_800", num_classes=10)
    with pytest.raises(ConfigError, match="image_size"):
        create_model("mlp", num_classes=10, image_size=28)(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------- parameter counts
def cifar_resnet_params(depth: int, widths: tuple[int, int, int, int], classes: int, in_ch: int = 3) -> int:
    """Independent count: 3x3 convs without bias, BN (2 params per channel), 1x1 projection shortcuts."""
    n = (depth - 2) // 6
    stem, *stages = widths
    total = 9 * in_ch * stem + 2 * stem
    prev = stem
    for i, w in enumerate(stages):
        for b in range(n):
            cin = prev if b == 0 else w
            total += 9 * cin * w + 2 * w + 9 * w * w + 2 * w
            if b == 0 and (cin != w or i > 0):
                total += cin * w + 2 * w
        prev = w
    return total + stages[-1] * classes + classes


def wrn_params(depth: int, k: int, classes: int, in_ch: int = 3) -> int:
    n = (depth - 4) // 6
    widths = [16 * k, 32 * k, 64 * k]
    total, prev = 9 * in_ch * 16, 16
    for w in widths:
        for b in range(n):
            cin = prev if b == 0 else w
            total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
        prev = w
    return total + 2 * widths[-1] + widths[-1] * classes + classes


@pytest.mark.parametrize(
    "name,classes,published",
    [
        # He et al. 2016 report 0.27M for ResNet-20 (their zero-padding shortcuts save ~3k parameters).
        ("resnet20", 10, 0.27e6),
        ("resnet56", 10, 0.85e6),
        ("resnet110", 10, 1.7e6),
        # CRD (Tian et al. 2020), Table 1: CIFAR-100 teachers/students.
        ("resnet8x4", 100, 1.23e6),
        ("resnet32x4", 100, 7.43e6),
        ("wrn_40_2", 100, 2.26e6),
        ("wrn_16_2", 100, 0.70e6),
    ],
)
def test_parameter_counts(name, classes, published):
    model = create_model(name, num_classes=classes)
    count = n_params(model)
    if name.startswith("wrn"):
        _, depth, k = name.split("_")
        expected = wrn_params(int(depth), int(k), classes)
    else:
        depth = int(name[len("resnet"):].removesuffix("x4"))
        widths = (32, 64, 128, 256) if name.endswith("x4") else (16, 16, 32, 64)
        expected = cifar_resnet_params(depth, widths, classes)
    assert count == expected
    assert count == pytest.approx(published, rel=0.035)


def test_parameter_count_follows_in_channels():
    grey_x4 = create_model("resnet32x4", 100, in_channels=1)
    assert n_params(grey_x4) == cifar_resnet_params(32, (32, 64, 128, 256), 100, 1)
    assert n_params(create_model("wrn_40_2", 100, in_channels=1)) == wrn_params(40, 2, 100, 1)


# TAKD table, written out independently of distill.models.takd_cnn: (convs per block, pools), FCs.
TAKD_TABLE = {
    "takd_cnn2": ([[16], [16]], True, []),
    "takd_cnn4": ([[16, 16], [32, 32]], True, []),
    "takd_cnn6": ([[16, 16], [32, 32], [64, 64]], True, []),
    "takd_cnn8": ([[16, 16], [32, 32], [64, 64], [128, 128]], True, [64]),
    "takd_cnn10": ([[32, 32], [64, 64], [128, 128], [256] * 4], True, [128]),
    "takd_cnn2_c100": ([[32], [32]], True, []),
    "takd_cnn4_c100": ([[32, 32], [64, 64]], True, []),
    "takd_cnn6_c100": ([[32, 32], [64, 64], [128, 128]], False, []),  # no pool after the last block
    "takd_cnn8_c100": ([[32, 32], [64, 64], [128, 128], [256, 256]], True, [64]),
    "takd_cnn10_c100": ([[32, 32], [64, 64], [128, 128], [256] * 4], True, [512]),
}


@pytest.mark.parametrize("name", sorted(TAKD_TABLE))
@pytest.mark.parametrize("classes", [10, 100])
def test_takd_parameter_count_from_table(name, classes):
    blocks, last_pool, fcs = TAKD_TABLE[name]
    total, cin, side = 0, 3, 32
    for i, block in enumerate(blocks):
        for c in block:
            total += 9 * cin * c + c + 2 * c  # conv with bias, BatchNorm
            cin = c
        if last_pool or i < len(blocks) - 1:
            side //= 2
    width = cin * side * side  # the official code flattens the 32x32 input's final map
    for h in fcs + [classes]:
        total += width * h + h
        width = h
    model = create_model(name, num_classes=classes)
    assert n_params(model) == total
    assert len(model.forward_features(torch.zeros(1, 3, 32, 32))) == len(blocks)
    # Identical at 32x32: the adaptive pool in front of the flatten is the identity there.
    feats = model.eval().forward_features(torch.randn(2, 3, 32, 32))
    assert model.pool(feats[-1]).shape == feats[-1].shape
    torch.testing.assert_close(model.pool(feats[-1]), feats[-1])


def test_takd_structure_matches_official_code():
    model = create_model("takd_cnn10", num_classes=10)
    kinds = [type(m).__name__ for m in model.conv_layers]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert all(m.bias is not None for m in model.conv_layers if isinstance(m, nn.Conv2d))
    # Hidden FC followed by ReLU, no dropout: FC1024->128, ReLU, FC128->10.
    assert [type(m).__name__ for m in model.fc_layers] == ["Linear", "ReLU", "Linear"]
    assert model.fc_layers[0].in_features == 256 * 2 * 2


# ----------------------------------------------------------------------------- peer checkpoints
def shared_data() -> Path | None:
    for root in (Path("/work/shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if (root / "peer-checkpoints").is_dir():
            return root
    return None


PEER_FILES = sorted((shared_data() or Path("/nonexistent")).glob("peer-checkpoints/*.pth"))


@pytest.mark.skipif(not PEER_FILES, reason="shared peer checkpoints not available on this machine")
@pytest.mark.parametrize("path", PEER_FILES, ids=[p.stem for p in PEER_FILES])
def test_peer_checkpoint_reproduces_logits(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(path.stem, num_classes=100).eval()
    model.load_state_dict(ckpt["model"])  # their parameter names, unchanged
    with torch.no_grad():
        logits = model(ckpt["input"])
    reference = ckpt["logits"]
    # With random BatchNorm statistics the deep nets' logits grow to 1e10 (resnet110), so the
    # tolerance is 1e-4 relative to the logits' scale (float32 round-off alone is ~1e-7 of it).
    scale = max(1.0, reference.abs().max().item())
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4 * scale)
    # the converter accepts the whole checkpoint and DataParallel prefixes
    wrapped = {"model": {"module." + k: v for k, v in ckpt["model"].items()}}
    model.load_state_dict(convert_peer_state_dict(path.stem, wrapped))


def test_convert_peer_state_dict():
    model = create_model("resnet8", num_classes=100)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    converted = convert_peer_state_dict("resnet8", {"state_dict": state})
    assert converted.keys() == model.state_dict().keys()
    with pytest.raises(UnknownNameError, match="resnet8x4"):
        convert_peer_state_dict("resnet8x5", state)


# ----------------------------------------------------------------------------- registry
def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet2", num_classes=10)
    message = str(info.value)
    assert "resnet20" in message and "list_models()" in message and "\n" not in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    with pytest.raises(UnknownNameError, match="wrn_40_2"):
        create_model("WRN_40_2x", num_classes=10)


def test_bad_options():
    with pytest.raises(ConfigError, match="dropout") as info:
        create_model("resnet20", num_classes=10, dropout=0.5)
    assert "its options are: width" in str(info.value)  # the width multiplier (ResidualKD) is its only option
    with pytest.raises(ConfigError, match="drop_rate"):
        create_model("wrn_16_2", num_classes=10, dropRate=0.3)
    assert create_model("wrn_16_2", num_classes=10, drop_rate=0.3).block1.layer[0].drop_rate == 0.3
    with pytest.raises(ConfigError, match="pretrained"):
        create_model("resnet20", num_classes=10, pretrained=True)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet20", num_classes=0)


def test_register_model():
    class Tiny(ClassifierModel):
        def __init__(self, num_classes, width):
            super().__init__()
            self.num_classes, self.feature_channels = num_classes, [width]
            self.body, self.fc = nn.Conv2d(3, width, 1), nn.Linear(width, num_classes)

        def forward_features(self, x):
            return [self.body(x)]

        def forward_head(self, f):
            return self.fc(f.mean((2, 3)))

    @register_model(name="tiny_for_test")
    def _tiny(num_classes, in_channels=3, image_size=None, width=4):
        return Tiny(num_classes, width)

    try:
        assert "tiny_for_test" in list_models("tiny_*")
        check_contract(create_model("tiny_for_test", 3, width=5), torch.randn(2, 3, 8, 8), 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name="tiny_for_test")(lambda num_classes, **kw: None)
    finally:
        from distill.models import registry

        registry._REGISTRY.pop("tiny_for_test", None)


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_resnet18_grey():
    model = create_model("tv.resnet18", num_classes=10, in_channels=1)
    assert model.feature_channels == [64, 128, 256, 512]
    check_contract(model, torch.randn(2, 1, 64, 64), 10)
    assert len(model.forward_features(torch.randn(1, 1, 32, 32))) == 4
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 10


def test_torchvision_listing_and_unknown_name():
    assert "tv.resnet18" in list_models("tv.resnet*")
    assert "tv.resnet18" not in list_models()
    with pytest.raises(UnknownNameError, match="tv.resnet18"):
        create_model("tv.resnet81", num_classes=10)
    with pytest.raises(ConfigError, match="tv.resnet18"):
        create_model("tv.resnet18", num_classes=10, no_such_option=1)


def test_torchvision_loads_bare_state_dict():
    model = create_model("tv.resnet18", num_classes=10)
    bare = {k.removeprefix("net."): v.clone() + 1 for k, v in model.state_dict().items() if v.is_floating_point()}
    other = create_model("tv.resnet18", num_classes=10)
    other.load_state_dict({**{k.removeprefix("net."): v for k, v in other.state_dict().items()}, **bare})
    torch.testing.assert_close(other.net.fc.weight, bare["fc.weight"])
    other.load_state_dict(model.state_dict())  # the prefixed form still works


@pytest.fixture
def fake_imagenet_weights(monkeypatch):
    """Serves random 'pretrained' resnet18 weights instead of downloading them."""
    import torchvision
    from torchvision.models import _api

    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(_api, "load_state_dict_from_url", lambda *args, **kwargs: state)
    return state


def test_torchvision_pretrained_adapts_head_and_stem(fake_imagenet_weights):
    model = create_model("tv.resnet18", num_classes=10, in_channels=1, pretrained=True)
    torch.testing.assert_close(model.net.layer1[0].conv1.weight, fake_imagenet_weights["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.net.conv1.weight, fake_imagenet_weights["conv1.weight"].sum(1, keepdim=True))
    assert model.net.fc.out_features == 10
    check_contract(model, torch.randn(2, 1, 64, 64), 10)


def test_torchvision_pretrained_offline(monkeypatch, tmp_path):
    from torchvision.models import _api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(_api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        create_model("tv.resnet18", num_classes=10, pretrained=True)
    assert "could not download" in str(info.value)
    assert str(tmp_path) in str(info.value) and "resnet18-" in str(info.value)


def test_torchvision_unsupported_features_still_classify():
    model = create_model("tv.googlenet", num_classes=7, init_weights=False, aux_logits=False)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ConfigError, match="stage features"):
        model.forward_features(torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------- timm
def test_timm_model():
    pytest.importorskip("timm")
    model = create_model("timm.test_resnet", num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 64, 64)
    check_contract(model, x, 10)
    torch.testing.assert_close(model(x), model.net(x))
    assert len(model.feature_channels) > 1
    with pytest.raises(UnknownNameError, match="timm.test_resnet"):
        create_model("timm.test_resnett", num_classes=10)


def test_timm_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ConfigError, match="pip install timm"):
        create_model("timm.resnet18", num_classes=10)
