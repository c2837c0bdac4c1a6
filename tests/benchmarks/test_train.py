"""The training script's data path: the held-out validation split and the on-device augmentation."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import splits  # noqa: E402
import train  # noqa: E402
from fairpruner import data  # noqa: E402


def test_validation_split_is_balanced_disjoint_and_fixed():
    labels = [c for c in range(10) for _ in range(60)][::-1]
    val, rest = splits.validation_split(labels, per_class=20)
    assert len(val) == 200 and len(rest) == 400
    assert sorted(val + rest) == list(range(600))
    assert np.bincount([labels[i] for i in val]).tolist() == [20] * 10
    assert splits.validation_split(labels, per_class=20) == (val, rest)
    assert splits.validation_split(labels, per_class=20, seed=1)[0] != val


def _reference(x: torch.Tensor, i: int, j: int, flip: bool, p: int) -> torch.Tensor:
    c, h, w = x.shape
    padded = x.new_zeros((c, h + 2 * p, w + 2 * p))
    padded[:, p:p + h, p:p + w] = x
    out = padded[:, i:i + h, j:j + w]
    return out.flip(-1) if flip else out


def test_crop_flip_matches_per_image_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 6), generator=g, dtype=torch.uint8)
    shifts = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    got = train.crop_flip(x, shifts, flips, 4)
    want = torch.stack([_reference(x[k], int(shifts[k, 0]), int(shifts[k, 1]), bool(flips[k]), 4) for k in range(16)])
    assert got.dtype == torch.uint8 and torch.equal(got, want)


def _dataset(n: int = 40) -> data.ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return data.ArrayDataset(images, [k % 4 for k in range(n)], [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], augment=True)


def test_device_batches_normalise_like_the_dataset_and_repeat_per_epoch():
    ds = _dataset()
    batches = train.DeviceBatches(ds, batch_size=16, device=torch.device("cpu"), seed=3)
    assert len(batches) == 2  # the partial batch is dropped
    first = list(batches.epoch(1))
    again = list(batches.epoch(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], next(batches.epoch(2))[0])
    plain = data.ArrayDataset(ds.images.numpy(), ds.targets, ds.mean, ds.std)
    # an unshifted, unflipped crop is the image itself: normalised exactly as the dataset does
    no_aug = train.crop_flip(batches.x[:4], torch.full((4, 2), 4), torch.zeros(4, dtype=torch.bool), 4)
    normalised = (no_aug.float().div_(255) - batches.mean) / batches.std
    assert torch.allclose(normalised, torch.stack([plain[k][0] for k in range(4)]))
    xs, ys = first[0]
    assert xs.shape == (16, 3, 8, 8) and xs.dtype == torch.float32 and ys.shape == (16,)


def test_seconds_per_epoch_times_a_copy_and_leaves_the_model_alone():
    ds = _dataset(64)
    batches = train.DeviceBatches(ds, batch_size=16, device=torch.device("cpu"), seed=0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = train.seconds_per_epoch(model, batches, torch.device("cpu"), bf16=False)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("argv, message", [(["--minutes", "0"], "--minutes must be positive")])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err
