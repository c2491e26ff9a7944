"""Load and reshape small real datasets for the example scripts (numpy, torch, scikit-learn only)."""

import gzip
import os
import resource
import sys

import numpy as np
import torch

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(file):
    """Read one IDX file (gzipped or not) into a numpy array.

    Layout: two zero bytes, a type byte (0x08 = uint8, the only one MNIST-style files use), the number
    of dimensions d, then d big-endian int32 sizes, then the data in C order.
    """
    opener = gzip.open if str(file).endswith(".gz") else open
    with opener(file, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"read_idx: {file} is not an unsigned-byte IDX file (header {raw[:4]!r}).")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory, stem):
    # Some mirrors ship the files already gunzipped, so accept either spelling.
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def load_fashion_mnist(path=None):
    """Load Fashion-MNIST as flat float32 pixels in [0, 1], or scikit-learn digits if it is absent.

    The directory is `path`, else $MLO_FASHION_MNIST, else /usr/share/datasets/fashion-mnist (Debian
    package dataset-fashion-mnist). Returns {"train": (x, y), "test": (x, y), "name", "num_features",
    "num_classes"} with x float32 of shape N x 784 (60000 / 10000) and y int64. Without the four IDX
    files it prints one line and returns digits: 8x8 images (64 features) scaled by 1/16, split 1297
    train / 500 test, stratified, with a fixed seed, so the examples always run.
    """
    directory = path or os.environ.get("MLO_FASHION_MNIST") or DEFAULT_FASHION_MNIST
    found = {stem: _find(directory, stem) for stems in _FILES.values() for stem in stems}
    missing = [stem for stem, file in found.items() if file is None]
    if missing:
        print(f"load_fashion_mnist: no {missing[0]}[.gz] in {directory}; "
              "falling back to scikit-learn digits (8x8, 64 features).")
        return _load_digits()
    data = {"name": "fashion-mnist", "num_features": 784, "num_classes": 10}
    for split, (images, labels) in _FILES.items():
        x = read_idx(found[images]).reshape(-1, 784)
        y = read_idx(found[labels]).astype(np.int64)
        data[split] = (torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y))
    return data


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=500, random_state=0, stratify=digits.target)
    as_torch = lambda x, y: (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    return {"name": "digits", "num_features": 64, "num_classes": 10,
            "train": as_torch(x_train, y_train), "test": as_torch(x_test, y_test)}


def long_tailed(x, y, imbalance, num_classes, seed):
    """Subsample to a long-tailed class distribution with geometric class counts.

    Class c keeps int(n_max * imbalance ** (-c / (C - 1))) random samples (the class-balanced-loss and
    Meta-Weight-Net convention), where n_max is the smallest per-class count available, so class 0 is
    the head and class C - 1 keeps n_max / imbalance. Returns x, y in their original order.
    """
    if imbalance < 1:
        raise ValueError(f"long_tailed: imbalance must be >= 1 (head / tail ratio), got {imbalance}.")
    generator = torch.Generator().manual_seed(seed)
    n_max = int(torch.bincount(y, minlength=num_classes).min())
    keep = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        count = int(n_max * imbalance ** (-c / (num_classes - 1)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    index = torch.cat(keep).sort().values
    return x[index], y[index]


def balanced_subset(x, y, per_class, seed):
    """Draw exactly `per_class` random samples of every class, e.g. a 100-sample meta set.

    Returns x_subset, y_subset and rest, the sorted int64 indices of every other sample, so callers
    can index x, y and any per-sample mask with it.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"balanced_subset: class {int(c)} has {len(members)} samples, "
                             f"fewer than per_class={per_class}; lower per_class.")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    subset = torch.cat(chosen)
    in_subset = torch.zeros(len(y), dtype=torch.bool)
    in_subset[subset] = True
    return x[subset], y[subset], torch.nonzero(~in_subset).flatten()


def noisy_labels(y, num_classes, rate, kind, seed):
    """Corrupt labels: each flips with probability `rate`, always to a different class.

    kind "symmetric": a flipped label becomes a uniformly random other class, (y + U{1..C-1}) mod C.
    kind "flip": class c becomes (c + 1) mod C, a class-dependent (pair) noise.
    Returns the noisy labels and the boolean mask of flipped samples.
    """
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.rand(len(y), generator=generator) < rate
    if kind == "symmetric":
        shift = torch.randint(1, num_classes, (len(y),), generator=generator)
    elif kind == "flip":
        shift = torch.ones_like(y)
    else:
        raise ValueError(f"noisy_labels: kind must be 'symmetric' or 'flip', got {kind!r}.")
    return torch.where(flipped, (y + shift) % num_classes, y), flipped


def shifted_domain(x, y, seed, noise_std=0.2, contrast=(0.3, 0.8), harmful_fraction=0.2, num_classes=10):
    """Build a shifted, partly harmful source domain from real images in [0, 1].

    Every image gets a random contrast cut, x' = m + a (x - m) with m its mean pixel and
    a ~ U(contrast), then additive Gaussian noise of std `noise_std`, clipped back to [0, 1]. A random
    `harmful_fraction` of samples also gets its label sent through one fixed random derangement of the
    classes, so those samples teach a consistent wrong mapping rather than unbiased noise.
    Returns x_shifted, y_shifted and the boolean mask of harmful samples.
    """
    generator = torch.Generator().manual_seed(seed)
    scale = torch.empty(len(x), 1).uniform_(*contrast, generator=generator)
    mean = x.mean(dim=1, keepdim=True)
    noise = noise_std * torch.randn(x.shape, generator=generator)
    shifted = (mean + scale * (x - mean) + noise).clamp(0.0, 1.0)
    order = torch.randperm(num_classes, generator=generator)
    derangement = torch.empty_like(order)
    derangement[order] = order.roll(-1)  # a cycle through all classes has no fixed point
    harmful = torch.rand(len(y), generator=generator) < harmful_fraction
    return shifted, torch.where(harmful, derangement[y], y), harmful


class Batches:
    """Iterate over shuffled (x_batch, y_batch) pairs, one epoch per call to iter().

    Epoch e uses the permutation of a torch.Generator seeded with seed + e, so runs are reproducible
    and every epoch has a new order; the last batch may be smaller.
    """

    def __init__(self, x, y, batch_size, seed):
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        # Draw the order now, not lazily, so the epoch counts iter() calls rather than first next() calls.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.y), generator=generator)
        return ((self.x[index], self.y[index]) for index in order.split(self.batch_size))


def batches(x, y, batch_size, seed):
    """Return a re-iterable `Batches` over (x, y); each iter() is a fresh, reshuffled epoch."""
    return Batches(x, y, batch_size, seed)


def peak_rss_mb():
    """Return this process's peak resident set size in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
