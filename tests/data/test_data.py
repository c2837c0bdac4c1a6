"""Tests for fairpruner.data: image folders, CIFAR-10 loading and caching, digits, specs, calibration loaders."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from fairpruner import data

CLASSES = ["ant", "bird", "cat"]  # sorted order; created in another order below on purpose
REAL_CIFAR = Path("/work/shared/datasets/cifar10-jpg.tar.gz")


def colour(label: int, index: int) -> tuple[int, int, int]:
    """Distinct, exactly representable colour per image (PNG is lossless)."""
    return (40 * label + 10, 20 * index + 5, 200 - 30 * label)


def make_tree(root: Path, splits=("train", "test"), per_class: int = 4, size: int = 32) -> Path:
    for split in splits:
        for name in ["cat", "ant", "bird"]:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), colour(CLASSES.index(name), i)).save(d / f"{i:04d}.png")
    return root


def make_tar(tree: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=split)
    return path


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def archive(tree: Path, tmp_path: Path) -> Path:
    return make_tar(tree, tmp_path / "tiny.tar.gz")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the default cache out of the real home directory."""
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("FAIRPRUNER_CACHE", str(cache))
    return cache


def expected_pixel(label: int, index: int, mean, std) -> torch.Tensor:
    rgb = torch.tensor(colour(label, index), dtype=torch.float32) / 255
    return (rgb - torch.tensor(mean)) / torch.tensor(std)


def test_image_folder_classes_labels_and_pixels(tree: Path) -> None:
    ds = data.ImageFolder(tree / "train")
    assert ds.classes == CLASSES
    assert ds.targets == [0] * 4 + [1] * 4 + [2] * 4
    x, y = ds[5]
    assert (x.shape, x.dtype, y) == ((3, 32, 32), torch.float32, 1)
    assert torch.allclose(x[:, 0, 0], torch.tensor(colour(1, 1), dtype=torch.float32) / 255)
    sizes = data.ImageFolder(tree / "train", transform=lambda im: im.size)
    assert sizes[0] == ((32, 32), 0)


def test_cifar10_dir_and_tar_agree_and_normalise(tree: Path, archive: Path, tmp_path: Path) -> None:
    from_dir = data.cifar10(tree, "test", cache_dir=tmp_path / "c1")
    from_tar = data.cifar10(archive, "test", cache_dir=tmp_path / "c2")
    assert len(from_dir) == len(from_tar) == 12
    assert from_dir.classes == from_tar.classes == CLASSES
    assert from_dir.targets == from_tar.targets == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(12):
        (a, ya), (b, yb) = from_dir[i], from_tar[i]
        assert torch.equal(a, b) and ya == yb and isinstance(ya, int)
    x, y = from_tar[9]  # cat, image 1
    assert (x.shape, x.dtype, y) == ((3, 32, 32), torch.float32, 2)
    want = expected_pixel(2, 1, data.CIFAR10_MEAN, data.CIFAR10_STD)
    assert torch.allclose(x, want.view(3, 1, 1).expand(3, 32, 32), atol=1e-6)


def test_cache_is_reused_and_invalidated(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_decode = data._images._decode
    monkeypatch.setattr(data._images, "_decode", lambda *a: calls.append(1) or real_decode(*a))
    cache = tmp_path / "cache"
    first = data.cifar10(archive, "train", cache_dir=cache)
    files = list(cache.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind
    with np.load(files[0]) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (12, 32, 32, 3)
        assert z["labels"].dtype == np.int64 and list(z["classes"]) == CLASSES
    mtime = files[0].stat().st_mtime_ns
    second = data.cifar10(archive, "train", cache_dir=cache)
    assert len(calls) == 1 and files[0].stat().st_mtime_ns == mtime
    assert torch.equal(first[3][0], second[3][0]) and second.classes == CLASSES
    st = archive.stat()  # a changed source (new mtime) must be decoded again
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    data.cifar10(archive, "train", cache_dir=cache)
    assert len(calls) == 2


def test_a_file_moved_to_another_class_is_not_served_from_the_cache(tree: Path, tmp_path: Path) -> None:
    """Moving a file keeps the folder's count, total size and newest mtime; its class/name is in the key."""
    cache = tmp_path / "cache"
    before = data.load_dataset(str(tree), "train", cache_dir=cache).targets
    (tree / "train" / "cat" / "0003.png").rename(tree / "train" / "ant" / "0009.png")
    after = data.load_dataset(str(tree), "train", cache_dir=cache).targets
    assert list(after) == list(data.load_dataset(str(tree), "train", cache_dir=False).targets)
    assert list(after) != list(before)


def test_sixteen_bit_greyscale_keeps_its_top_eight_bits(tmp_path: Path) -> None:
    for name, level in (("dark", 0x3000), ("light", 0xC000)):
        (tmp_path / "g" / name).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), level, dtype=np.uint16)).save(tmp_path / "g" / name / "0.png")
    ds = data.load_dataset(str(tmp_path / "g"), "train", cache_dir=False)
    folder = data.ImageFolder(tmp_path / "g")
    assert sorted({int(v) for v in np.asarray(ds.images).reshape(-1)}) == [0x30, 0xC0]
    assert folder[0][0].max().item() == pytest.approx(0x30 / 255)


def test_calibration_images_of_different_sizes_are_named(tmp_path: Path) -> None:
    for name, size in (("a", 8), ("b", 10)):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (size, size)).save(tmp_path / "f" / name / f"{i}.png")
    loader = data.calibration_loader(data.ImageFolder(tmp_path / "f"), samples_per_class=2, batch_size=4)
    with pytest.raises(ValueError, match=r"differ in size \(\(3, 8, 8\), \(3, 10, 10\)\).*transform"):
        next(iter(loader))


def test_a_file_that_is_not_an_image_is_named(tree: Path) -> None:
    (tree / "train" / "cat" / "0009.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cat/0009.png is not a readable image"):
        data.load_dataset(str(tree), "train", cache_dir=False)
    with pytest.raises(ValueError, match="0009.png is not a readable image"):
        ds = data.ImageFolder(tree / "train")
        ds[[p.name for p, _ in ds.samples].index("0009.png")]


def test_default_cache_dir_and_disabled_cache(archive: Path, tmp_path: Path, isolated_cache: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = snapshot(tmp_path)
    data.cifar10(archive, "test", cache_dir=False)
    assert snapshot(tmp_path) == before
    data.cifar10(archive, "test")
    assert [p.suffix for p in isolated_cache.iterdir()] == [".npz"]


def test_missing_split_and_source(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        data.cifar10(tree, "val", cache_dir=False)
    with pytest.raises(FileNotFoundError):
        data.cifar10(tmp_path / "nope", "train", cache_dir=False)


def test_augment_shapes_determinism_and_padding() -> None:
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, :, :16] = 255  # left half white: flips and shifts are visible
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = data.ArrayDataset(img, [0], mean, std)[0][0]
    aug = data.ArrayDataset(img, [0], mean, std, augment=True)
    torch.manual_seed(123)
    first = [aug[0][0] for _ in range(20)]
    torch.manual_seed(123)
    again = [aug[0][0] for _ in range(20)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(x, plain) for x in first)
    # Column 24 can only be white when flipped (shifts are at most 4 pixels); both cases must occur.
    assert {x[0, 0, 24].item() for x in first} == {-2.0, 2.0}
    # Padding is black pixels, i.e. (0 - mean) / std after normalisation; white is (1 - mean) / std.
    values = torch.unique(torch.stack(first))
    assert set(values.tolist()) <= {-2.0, 2.0}


def test_array_dataset_validates() -> None:
    with pytest.raises(ValueError):
        data.ArrayDataset(np.zeros((2, 4, 4, 3), np.float32), [0, 1], (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError):
        data.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), [0], (0, 0, 0), (1, 1, 1))
    ds = data.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 2]), (0, 0, 0), (1, 1, 1))
    assert ds.classes == ["0", "1", "2"] and ds.targets == [0, 2]


def test_digits_split_and_scaling() -> None:
    train, test = data.digits("train"), data.digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    x, y = train[0]
    assert (x.shape, x.dtype, type(y)) == ((1, 8, 8), torch.float32, int)
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1) < 1e-3
    total = data.class_counts(train)
    for label, n in data.class_counts(test).items():  # stratified: every class ~25% held out
        assert abs(n - 0.25 * (n + total[label])) <= 1
    assert data.digits("test").targets == test.targets
    assert data.digits("test", seed=1).targets != test.targets


def test_load_dataset_specs(tree: Path, archive: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert len(data.load_dataset("digits", "test")) == 450
    by_prefix = data.load_dataset(f"cifar10:{tree}", "train", cache_dir=cache)
    by_tar = data.load_dataset(str(archive), "train", cache_dir=cache)
    assert by_prefix.mean == by_tar.mean == data.CIFAR10_MEAN
    assert torch.equal(by_prefix[0][0], by_tar[0][0])

    # Plain folders with train/ and test/: statistics come from the train split for both splits.
    (tree / "test" / "ant" / "0000.png").unlink()
    user_test = data.load_dataset(str(tree), "test", cache_dir=cache)
    user_train = data.load_dataset(str(tree), "train", cache_dir=cache)
    assert len(user_test) == 11 and user_test.mean == user_train.mean
    pixels = np.array([colour(label, i) for label in range(3) for i in range(4)]) / 255
    assert np.allclose(user_train.mean, pixels.mean(0)) and np.allclose(user_train.std, pixels.std(0))
    x = torch.stack([user_train[i][0] for i in range(12)])
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)

    # A single image folder is used whole, whatever the split.
    single = data.load_dataset(str(tree / "train"), "test", augment=True, cache_dir=cache)
    assert single.classes == CLASSES and len(single) == 12 and single.augment


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="digits.*cifar10"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("digits", "val")
    mixed = make_tree(tmp_path / "mixed", splits=("all",), per_class=1) / "all"
    Image.new("RGB", (16, 16)).save(mixed / "cat" / "small.jpg")
    with pytest.raises(ValueError, match="share one size.*small.jpg is 16x16, expected 32x32"):
        data.load_dataset(str(mixed), cache_dir=False)


class LabelsOnly(Dataset):
    """No ``.targets``: labels must be read by iterating."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)), self.labels[i]


def small_dataset(per_class=(10, 10, 10)) -> data.ArrayDataset:
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    return data.ArrayDataset(np.zeros((len(labels), 2, 2, 3), np.uint8), labels, (0, 0, 0), (1, 1, 1))


def loader_labels(loader) -> list[int]:
    return [y for _, ys in loader for y in ys.tolist()]


def test_calibration_loader_balanced_mixed_deterministic() -> None:
    ds = small_dataset((10, 20, 30))
    rng_before = torch.get_rng_state()
    loader = data.calibration_loader(ds, samples_per_class=4, batch_size=3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    labels = loader_labels(loader)
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert all(sorted(ys.tolist()) == [0, 1, 2] for _, ys in loader)  # every batch mixes classes
    idx = loader.dataset.indices
    assert idx == data.calibration_loader(ds, 4, 3, seed=7).dataset.indices
    assert idx != data.calibration_loader(ds, 4, 3, seed=8).dataset.indices
    assert len(set(idx)) == 12
    plain = LabelsOnly(ds.targets)
    assert data.calibration_loader(plain, 4, 3, seed=7).dataset.indices == idx
    assert data.class_counts(plain) == data.class_counts(ds) == {0: 10, 1: 20, 2: 30}


def test_calibration_loader_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        data.calibration_loader(small_dataset((10,)), samples_per_class=4)
    with pytest.raises(ValueError, match="class 1 has 1"):
        data.calibration_loader(small_dataset((10, 1, 10)), samples_per_class=4)
    with pytest.raises(ValueError, match="class 3 has 0"):
        data.calibration_loader(small_dataset((5, 5, 5)), samples_per_class=4, num_classes=4)
    with pytest.warns(UserWarning, match=r"classes \[0\] have fewer than 5"):
        loader = data.calibration_loader(small_dataset((3, 10)), samples_per_class=5)
    assert sorted(loader_labels(loader)) == [0] * 3 + [1] * 5


@pytest.mark.skipif(not REAL_CIFAR.is_file(), reason="real CIFAR-10 archive not available")
def test_real_cifar10_test_split(tmp_path: Path) -> None:
    ds = data.cifar10(REAL_CIFAR, "test", cache_dir=tmp_path)
    assert len(ds) == 10_000 and len(ds.classes) == 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    assert data.class_counts(ds) == {c: 1000 for c in range(10)}
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert any(tmp_path.iterdir())  # the decoded split is cached ...
    again = data.cifar10(REAL_CIFAR, "test", cache_dir=tmp_path)  # ... and read back unchanged
    assert again.targets == ds.targets and torch.equal(again[0][0], x)
