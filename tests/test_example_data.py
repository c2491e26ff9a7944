import gzip
import importlib.util
import pathlib
import struct

import numpy as np
import torch

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data.py"
_SPEC = importlib.util.spec_from_file_location("example_data", _PATH)
data = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(data)


def _write_idx(file, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(file, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _write_tiny_fashion_mnist(directory, rng):
    arrays = {}
    for images, labels, n in [("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 5),
                              ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 3)]:
        arrays[images] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[labels] = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(directory / (images + ".gz"), arrays[images])
        _write_idx(directory / (labels + ".gz"), arrays[labels])
    return arrays


def test_read_idx_parses_a_written_file(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(4, 3, 2), dtype=np.uint8)
    _write_idx(tmp_path / "tiny.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "tiny.gz"), array)


def test_load_fashion_mnist_reads_idx_files_from_path(tmp_path, capsys):
    arrays = _write_tiny_fashion_mnist(tmp_path, np.random.default_rng(1))
    loaded = data.load_fashion_mnist(str(tmp_path))
    x, y = loaded["train"]
    assert (loaded["name"], loaded["num_features"], loaded["num_classes"]) == ("fashion-mnist", 784, 10)
    assert x.shape == (5, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), arrays["train-images-idx3-ubyte"].reshape(5, 784) / 255.0, rtol=1e-6)
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert loaded["test"][0].shape == (3, 784)
    assert capsys.readouterr().out == ""


def test_load_fashion_mnist_reads_env_var_when_no_path(tmp_path, monkeypatch):
    _write_tiny_fashion_mnist(tmp_path, np.random.default_rng(2))
    monkeypatch.setenv("MLO_FASHION_MNIST", str(tmp_path))
    assert data.load_fashion_mnist()["train"][0].shape == (5, 784)


def test_load_fashion_mnist_falls_back_to_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLO_FASHION_MNIST", raising=False)
    loaded = data.load_fashion_mnist(str(tmp_path / "missing"))
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "falling back" in out and "missing" in out
    (x_train, _), (x_test, y_test) = loaded["train"], loaded["test"]
    assert (loaded["name"], loaded["num_features"], loaded["num_classes"]) == ("digits", 64, 10)
    assert x_train.shape == (1297, 64) and x_test.shape == (500, 64)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert set(y_test.tolist()) == set(range(10))


def test_long_tailed_counts_follow_geometric_formula():
    y = torch.arange(10).repeat_interleave(torch.tensor([500, 520, 510, 600, 500, 530, 505, 700, 501, 550]))
    x = y.float().unsqueeze(1) * 10
    x_tail, y_tail = data.long_tailed(x, y, imbalance=100, num_classes=10, seed=0)
    counts = torch.bincount(y_tail, minlength=10)
    expected = 500 * 100.0 ** (-torch.arange(10) / 9)
    assert torch.all((counts - expected).abs() < 1)
    assert counts[0] == 500 and counts[-1] == 5
    assert torch.equal(x_tail[:, 0], y_tail.float() * 10)


def test_noisy_labels_symmetric_rate_and_never_same_class():
    y = torch.randint(0, 10, (10_000,), generator=torch.Generator().manual_seed(0))
    noisy, flipped = data.noisy_labels(y, 10, rate=0.4, kind="symmetric", seed=1)
    assert abs(flipped.float().mean().item() - 0.4) < 0.02
    assert torch.all(noisy[flipped] != y[flipped]) and torch.equal(noisy[~flipped], y[~flipped])
    targets = torch.bincount(noisy[flipped & (y == 3)], minlength=10)
    assert targets[3] == 0 and torch.all(targets[torch.arange(10) != 3] > 0)


def test_noisy_labels_flip_maps_class_to_next():
    y = torch.randint(0, 10, (10_000,), generator=torch.Generator().manual_seed(0))
    noisy, flipped = data.noisy_labels(y, 10, rate=0.2, kind="flip", seed=1)
    assert abs(flipped.float().mean().item() - 0.2) < 0.02
    assert torch.equal(noisy[flipped], (y[flipped] + 1) % 10) and torch.equal(noisy[~flipped], y[~flipped])


def test_balanced_subset_has_per_class_of_each_and_rest_is_complement():
    y = torch.randint(0, 10, (1_000,), generator=torch.Generator().manual_seed(0))
    x = torch.arange(1_000).unsqueeze(1)
    x_meta, y_meta, rest = data.balanced_subset(x, y, per_class=10, seed=0)
    assert torch.equal(torch.bincount(y_meta, minlength=10), torch.full((10,), 10))
    assert torch.equal(y[x_meta[:, 0]], y_meta)
    assert torch.equal(torch.cat([x_meta[:, 0], rest]).sort().values, torch.arange(1_000))


def test_shifted_domain_changes_images_and_permutes_harmful_labels():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(5_000, 64, generator=generator), torch.randint(0, 10, (5_000,), generator=generator)
    x_shift, y_shift, harmful = data.shifted_domain(x, y, seed=0, harmful_fraction=0.3)
    assert abs(harmful.float().mean().item() - 0.3) < 0.03
    assert torch.all(y_shift[harmful] != y[harmful]) and torch.equal(y_shift[~harmful], y[~harmful])
    mapping = dict(zip(y[harmful].tolist(), y_shift[harmful].tolist()))
    assert len(set(mapping.items())) == 10 == len(set(mapping.values()))  # one fixed permutation of classes
    assert len({(a, b) for a, b in zip(y[harmful].tolist(), y_shift[harmful].tolist())}) == 10
    assert 0.0 <= float(x_shift.min()) and float(x_shift.max()) <= 1.0
    assert (x_shift - x).abs().mean() > 0.05


def test_shifted_domain_contrast_scales_each_image_within_range():
    x = torch.rand(200, 64, generator=torch.Generator().manual_seed(0))
    x_shift, _, _ = data.shifted_domain(x, torch.zeros(200, dtype=torch.int64), seed=0, noise_std=0.0,
                                        contrast=(0.3, 0.8), harmful_fraction=0.0)
    ratio = x_shift.std(dim=1) / x.std(dim=1)
    assert ratio.min() >= 0.3 - 1e-5 and ratio.max() <= 0.8 + 1e-5 and ratio.max() - ratio.min() > 0.3


def test_batches_cover_each_epoch_once_and_reshuffle():
    x = torch.arange(103).unsqueeze(1)
    loader = data.batches(x, x[:, 0], batch_size=10, seed=0)
    first, second = [torch.cat([xb[:, 0] for xb, _ in loader]) for _ in range(2)]
    assert len(loader) == 11
    assert torch.equal(first.sort().values, torch.arange(103)) and torch.equal(second.sort().values, torch.arange(103))
    assert not torch.equal(first, second)
    again = torch.cat([xb[:, 0] for xb, _ in data.batches(x, x[:, 0], batch_size=10, seed=0)])
    assert torch.equal(again, first)


def test_peak_rss_mb_exceeds_a_buffer_held_in_memory():
    buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32
    assert data.peak_rss_mb() > 64
    del buffer
