"""Image data: CIFAR-10 archives and image folders decoded once into cached uint8 arrays, the digits set,
and ``load_dataset`` for the command line's data specs."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "ArrayDataset", "cifar10", "digits", "load_dataset", "CIFAR10_MEAN", "CIFAR10_STD",
           "IMAGE_EXTENSIONS"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "test")
_CACHE_VERSION = 1  # bump when the cache layout changes so stale files are ignored

PathLike = Union[str, "os.PathLike[str]"]
CacheDir = Union[PathLike, None, bool]


def _is_image(name: str) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class ImageFolder(Dataset):
    """Generic ``root/<class>/<image>`` dataset decoded lazily with Pillow.

    Classes are the sorted sub-directory names and a label is the class's position in that list.

    Args:
        root: Directory holding one sub-directory per class.
        transform: Callable applied to each RGB ``PIL.Image``; by default the image becomes a float tensor
            CxHxW in [0, 1].
    """

    def __init__(self, root: PathLike, transform: Optional[Callable[[Image.Image], Any]] = None) -> None:
        self.root = Path(root)
        self.classes = _classes_in([self.root])
        if not self.classes:
            raise FileNotFoundError(f"no class sub-directories in {self.root}")
        self.samples = [(path, label) for label, _, path in _images_in(self.root, self.classes)]
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with _opened(path, path) as image:
            image = _rgb(image)
            image.load()  # the pixels, read before the file closes
        if self.transform is not None:
            return self.transform(image), label
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255), label


class ArrayDataset(Dataset):
    """In-memory image dataset returning ``(normalised float32 CxHxW tensor, label)``.

    Args:
        images: uint8 array of shape NxHxWxC.
        labels: One integer label per image.
        mean: Per-channel mean of pixel values scaled to [0, 1].
        std: Per-channel standard deviation of pixel values scaled to [0, 1].
        augment: Random crop (image size, 4-pixel zero padding) plus random horizontal flip. Padding is applied
            to the raw pixels (black), as in the usual CIFAR recipe; randomness comes from torch's global RNG so
            ``torch.manual_seed`` and DataLoader worker seeding apply.
        classes: Class names; defaults to the label values as strings.
    """

    padding = 4

    def __init__(self, images: np.ndarray, labels: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, classes: Optional[Sequence[str]] = None) -> None:
        images = np.ascontiguousarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 NxHxWxC, got {images.dtype} {images.shape}")
        if len(labels) != len(images) or not len(mean) == len(std) == images.shape[3]:
            raise ValueError(f"need one label per image and {images.shape[3]} mean/std values (one per channel)")
        self.images = torch.from_numpy(images)  # shares memory with the array
        self.targets = [int(v) for v in np.asarray(labels).tolist()]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._mean, self._std = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)
        self.augment = augment
        self.classes = list(classes) if classes else [str(i) for i in range(max(self.targets, default=-1) + 1)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].permute(2, 0, 1)
        if self.augment:
            (c, h, w), p = x.shape, self.padding
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            padded = x.new_zeros((c, h + 2 * p, w + 2 * p))
            padded[:, p:p + h, p:p + w] = x
            x = padded[:, i:i + h, j:j + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x.float().div_(255) - self._mean) / self._std, self.targets[index]

def _classes_in(dirs: Iterable[Path]) -> list[str]:
    return sorted({e.name for d in dirs if d.is_dir() for e in os.scandir(d)
                   if e.is_dir() and not e.name.startswith(".")})


def _images_in(folder: Path, classes: Sequence[str]) -> list[tuple[int, str, Path]]:
    """``(label, "class/file", path)`` for every image under ``folder/<class>/``, sorted by label then name."""
    items = []
    for label, name in enumerate(classes):
        d = folder / name
        if d.is_dir():
            files = sorted(e.name for e in os.scandir(d) if e.is_file() and _is_image(e.name))
            items.extend((label, f"{name}/{f}", d / f) for f in files)
    return items


def _read_tar(path: Path, split: str) -> tuple[list[str], list[tuple[str, str, bytes]]]:
    """Class names and ``(class, file, bytes)`` for ``[prefix/]<split>/<class>/<file>`` members of an archive."""
    classes, items = set(), []
    # Streaming mode reads the archive once, front to back, without building a random-access index.
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isdir() and len(parts) >= 2 and parts[-2] in SPLITS and not parts[-1].startswith("."):
                classes.add(parts[-1])
            elif member.isfile() and len(parts) >= 3 and parts[-3] in SPLITS and _is_image(parts[-1]):
                classes.add(parts[-2])
                if parts[-3] == split:
                    items.append((parts[-2], parts[-1], tar.extractfile(member).read()))
    return sorted(classes), items


def _opened(source: Any, name: Any) -> Image.Image:
    """``Image.open``, with the file named when it is not a readable image."""
    try:
        return Image.open(source)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{name} is not a readable image ({type(exc).__name__}); remove or replace it") from None


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. A 16-bit greyscale image keeps its top 8 bits (Pillow's own conversion saturates it)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(blobs: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
    """Decode encoded images into one uint8 NxHxWx3 array; all images must share the first one's size."""
    out: Optional[np.ndarray] = None
    for i, (blob, name) in enumerate(zip(blobs, names)):
        with _opened(io.BytesIO(blob), name) as image:
            if out is None:
                out = np.empty((len(blobs), image.height, image.width, 3), dtype=np.uint8)
            elif image.size != (out.shape[2], out.shape[1]):
                raise ValueError(f"all images must share one size (no resizing is done): {name} is "
                                 f"{image.width}x{image.height}, expected {out.shape[2]}x{out.shape[1]} "
                                 f"(from {names[0]})")
            out[i] = np.asarray(_rgb(image))
    return out


def _resolve_cache_dir(cache_dir: CacheDir) -> Optional[Path]:
    if cache_dir is None or cache_dir is True:
        return Path(os.environ.get("FAIRPRUNER_CACHE") or Path.home() / ".cache" / "fairpruner")
    return None if cache_dir is False else Path(cache_dir)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically, so concurrent readers never see a half-written cache file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as exc:  # a read-only home must not break loading
        warnings.warn(f"not caching decoded images: {exc}")
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_arrays(source: Path, split: Optional[str], cache_dir: CacheDir
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded ``(images NHWC uint8, labels int64, classes)`` of one split, via the cache when possible.

    ``source`` is an archive or a directory with ``train/``/``test/`` (``split`` picks one), or a plain image
    folder when ``split`` is None. Classes are the union over both splits so labels agree between them.
    """
    source = source.resolve()
    if source.is_file():
        key: list[Any] = [source.stat().st_size, source.stat().st_mtime_ns]
        files = None
    else:
        folder = source / split if split else source
        if not folder.is_dir():
            raise FileNotFoundError(f"no such archive or image folder: {folder}")
        classes = _classes_in([source / s for s in SPLITS] if split else [source])
        files = _images_in(folder, classes)
        stats = [p.stat() for _, _, p in files]
        # A directory's own mtime misses edits inside it, so the key covers every file used: its class/name (a
        # file moved to another class keeps size and mtime), size and mtime.
        names = hashlib.sha256("\n".join(rel for _, rel, _ in files).encode()).hexdigest()
        key = [classes, len(files), names, sum(s.st_size for s in stats),
               max((s.st_mtime_ns for s in stats), default=0)]
    digest = hashlib.sha256(repr([_CACHE_VERSION, str(source), split] + key).encode()).hexdigest()[:16]
    root = _resolve_cache_dir(cache_dir)
    cache_file = root / f"{source.name}-{split or 'all'}-{digest}.npz" if root else None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                return z["images"], z["labels"], [str(c) for c in z["classes"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: decode again and overwrite it
    if files is None:
        classes, raw = _read_tar(source, split or "train")
        index = {c: i for i, c in enumerate(classes)}
        entries = sorted((index[c], f"{c}/{f}", blob) for c, f, blob in raw)
    else:
        entries = [(label, name, path.read_bytes()) for label, name, path in files]
    if not entries:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r} in {source}")
    images = _decode([e[2] for e in entries], [f"{source}:{e[1]}" for e in entries])
    labels = np.array([e[0] for e in entries], dtype=np.int64)
    if cache_file is not None:
        _save_npz(cache_file, images=images, labels=labels, classes=np.array(classes, dtype=str))
    return images, labels, classes


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of pixels scaled to [0, 1], from 256-bin histograms (no float copy)."""
    levels, n = np.arange(256) / 255, max(images[..., 0].size, 1)
    hists = [np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])]
    mean = np.array([h @ levels for h in hists]) / n
    std = np.sqrt(np.maximum(np.array([h @ levels**2 for h in hists]) / n - mean**2, 0.0))
    return mean.tolist(), [s if s > 1e-8 else 1.0 for s in std.tolist()]  # constant channel: avoid 0-division

def cifar10(root: PathLike, split: str = "train", augment: bool = False, cache_dir: CacheDir = None) -> ArrayDataset:
    """CIFAR-10 from image folders, normalised with the standard CIFAR-10 statistics.

    Args:
        root: Directory with ``train/<class>/`` and ``test/<class>/`` images, or a ``.tar.gz`` of that layout
            (read directly, nothing is extracted).
        split: ``"train"`` or ``"test"``.
        augment: Random crop with 4-pixel padding and horizontal flip (see ``ArrayDataset``).
        cache_dir: Where decoded arrays are cached; None means ``$FAIRPRUNER_CACHE`` or ``~/.cache/fairpruner``,
            False disables caching. The cache key covers the source path, size and modification time.

    Returns:
        Dataset of ``(float32 3x32x32 tensor, label)``; labels index the sorted class names.
    """
    _check_split(split)
    images, labels, classes = _load_arrays(Path(root), split, cache_dir)
    return ArrayDataset(images, labels, CIFAR10_MEAN, CIFAR10_STD, augment=augment, classes=classes)


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits with a deterministic stratified split.

    Pixels are scaled to [0, 1], then standardised with the scalar mean and std of the training split.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: Share of the 1,797 images held out for the test split.
        seed: Seed of the split.

    Returns:
        Dataset of ``(float32 1x8x8 tensor, label)`` with ``.targets`` and ``.classes``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0  # raw pixel values are 0..16
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    mean, std = float(x_train.mean()), float(x_train.std())
    xs, ys = (x_train, y_train) if split == "train" else (x_test, y_test)
    # ArrayDataset divides by 255, so store raw 0..16 pixels and rescale the statistics to match.
    raw = np.rint(xs * 16).astype(np.uint8).reshape(-1, 8, 8, 1)
    return ArrayDataset(raw, ys, [mean * 16 / 255], [std * 16 / 255], classes=[str(c) for c in bunch.target_names])


def load_dataset(spec: str, split: str = "train", augment: bool = False, cache_dir: CacheDir = None) -> Dataset:
    """Build a dataset from a command-line spec.

    * ``"digits"``: scikit-learn digits (``augment`` is ignored).
    * ``"cifar10:<path>"`` or a path to a ``.tar.gz``/``.tgz``: CIFAR-10-style ``train/`` and ``test/`` image
      folders, normalised with the CIFAR-10 statistics.
    * A directory with ``train/``/``test/`` sub-directories: ``split`` picks one; normalised per channel with the
      mean/std computed on the ``train/`` images (on the split itself when there is no ``train/``).
    * Any other directory: one image folder (``root/<class>/*``) returned whole for every split, normalised with
      the per-channel mean/std computed on its images.

    Folder images must all share one size (nothing is resized); they are decoded once and cached like CIFAR-10.

    Args:
        spec: Dataset spec, see above.
        split: ``"train"`` or ``"test"``.
        augment: Random crop and horizontal flip for image datasets.
        cache_dir: Cache location for decoded images, as in ``cifar10``.

    Returns:
        Dataset of ``(tensor, label)`` with ``.targets`` and ``.classes``.

    Raises:
        FileNotFoundError: For a path (a name with a folder or an extension) that does not exist.
        ValueError: For a spec that is none of the above.
    """
    _check_split(split)
    if spec.strip().lower() == "digits":
        return digits(split)
    if spec.lower().startswith("cifar10:"):
        return cifar10(spec.split(":", 1)[1], split, augment, cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and spec.lower().endswith((".tar.gz", ".tgz")):
        return cifar10(path, split, augment, cache_dir)
    if path.is_dir():
        has_splits = any((path / s).is_dir() for s in SPLITS)
        images, labels, classes = _load_arrays(path, split if has_splits else None, cache_dir)
        # Test data is normalised with training statistics so both splits see the same transform.
        needs_train = has_splits and split != "train" and (path / "train").is_dir()
        train = _load_arrays(path, "train", cache_dir)[0] if needs_train else images
        mean, std = _channel_stats(train)
        return ArrayDataset(images, labels, mean, std, augment=augment, classes=classes)
    if not path.exists() and (path.suffix or len(path.parts) > 1):  # meant as a path
        raise FileNotFoundError(2, "No such file or directory (the dataset given)", spec)
    raise ValueError(f"unknown dataset spec {spec!r}: expected 'digits', 'cifar10:<path>', a path to a .tar.gz "
                     "archive with train/ and test/ class folders, or an existing image-folder directory")
