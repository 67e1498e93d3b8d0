"""A user's own torch datasets as bundles (dfa_ext.data.as_bundle): labels found or read, the spec
inferred, the wrong shapes and kinds of data refused with one line, and the wrapped datasets
working with the package's split, loaders and run records."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from dfa_ext.data import (
    DataBundle,
    DataSpec,
    LabelledDataset,
    as_bundle,
    check_bundle,
    describe,
    infer_spec,
    load_data,
    make_loader,
)
from dfa_ext.data.device_batches import DeviceImages, data_on_device
from dfa_ext.data.split import split_train_val
from dfa_ext.errors import DataError

CPU = torch.device("cpu")


def tensor_data(n: int = 40, channels: int = 1, size: int = 6, classes: int = 4, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, size, size, generator=generator)
    labels = torch.arange(n) % classes
    return TensorDataset(images, labels)


class TorchvisionStyle(Dataset):
    """Like torchvision's MNIST/CIFAR: ``targets`` (a list) and ``classes``; counts item reads."""

    def __init__(self, n: int = 30) -> None:
        self.images = torch.rand(n, 3, 4, 4)
        self.targets = [i % 3 for i in range(n)]
        self.classes = ["cat", "dog", "bird"]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        self.reads += 1
        return self.images[index], self.targets[index]


class Epoched(TorchvisionStyle):
    """A dataset with its own epoch (as the package's are): the wrapper forwards set_epoch."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class Plain(Dataset):
    """No labels beside the items: labels are read by one pass; label tensors, as many return."""

    def __init__(self, n: int = 12, size: int = 5, label_offset: int = 0, image=None) -> None:
        self.n, self.size, self.label_offset, self.image, self.reads = n, size, label_offset, image, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        self.reads += 1
        image = torch.full((2, self.size, self.size), float(index)) if self.image is None else self.image
        return image, torch.tensor(index % 3 + self.label_offset)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_tensor_dataset_becomes_a_bundle_with_labels_and_an_inferred_spec():
    data = tensor_data(channels=3, size=6)
    bundle = as_bundle(data)
    assert isinstance(bundle, DataBundle) and bundle.test is None
    assert isinstance(bundle.train, LabelledDataset)
    assert bundle.train.labels.dtype == torch.int64 and torch.equal(bundle.train.labels, data.tensors[1])
    assert bundle.spec == DataSpec(name="custom", num_classes=4, in_channels=3, image_size=6,
                                   mean=(0.0,) * 3, std=(1.0,) * 3, class_names=("0", "1", "2", "3"))
    for i in (0, 7, len(data) - 1):
        image, label = bundle.train[i]
        assert torch.equal(image, data.tensors[0][i]) and type(label) is int and label == int(data.tensors[1][i])
    train, test = tensor_data(seed=1), tensor_data(n=8, seed=2)
    pair = as_bundle((train, test), name="my-digits", num_classes=5, require_test=True)
    assert pair.spec.name == "my-digits" and pair.spec.num_classes == 5 and len(pair.test) == 8


def test_torchvision_style_targets_and_classes_need_no_pass_over_the_items():
    data = TorchvisionStyle()
    bundle = as_bundle(data)
    assert data.reads <= 2  # item 0, for the spec and the check; labels from targets
    assert torch.equal(bundle.train.labels, torch.tensor(data.targets))
    assert bundle.spec.num_classes == 3 and bundle.spec.class_names == ("cat", "dog", "bird")
    assert bundle.spec.in_channels == 3 and bundle.spec.image_size == 4
    with pytest.raises(DataError, match="num_classes=4, but the dataset declares 3 classes") as excinfo:
        as_bundle(data, num_classes=4)
    one_line(excinfo)
    subset = torch.utils.data.Subset(data, [2, 0, 4])  # e.g. random_split: labels through the subset
    assert torch.equal(LabelledDataset(subset).labels, torch.tensor([2, 0, 1]))
    assert LabelledDataset(subset).classes == ("cat", "dog", "bird")


def test_a_dataset_without_labels_is_read_once_and_label_tensors_become_ints():
    data = Plain(n=12)
    wrapped = LabelledDataset(data)
    assert data.reads == 12  # the one pass
    assert torch.equal(wrapped.labels, torch.arange(12) % 3) and wrapped.labels.dtype == torch.int64
    image, label = wrapped[4]
    assert type(label) is int and label == 1 and torch.equal(image, torch.full((2, 5, 5), 4.0))
    bundle = as_bundle(data)
    assert bundle.spec.num_classes == 3 and bundle.spec.in_channels == 2 and bundle.spec.class_names == ("0", "1", "2")


def test_images_that_are_not_tensors_are_refused_naming_to_tensor():
    data = Plain(image=Image.new("L", (5, 5)))
    expected = r"the image is a PIL\.Image\.Image, not a tensor: add transforms\.ToTensor\(\)"
    with pytest.raises(DataError, match=expected) as excinfo:
        as_bundle(data)
    one_line(excinfo)


def test_a_users_own_loaders_make_a_bundle_of_batches_and_a_loader_beside_a_dataset_is_refused():
    from dfa_ext.data.user_batches import UserBatches

    train = TensorDataset(torch.randn(8, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    bundle = as_bundle((DataLoader(train, batch_size=4), DataLoader(train, batch_size=4)))
    assert isinstance(bundle.train, UserBatches) and len(bundle.train) == 2
    assert (bundle.spec.in_channels, bundle.spec.image_size, bundle.spec.num_classes) == (1, 4, 3)
    assert describe(bundle) == {"data": "custom", "augment": None}
    with pytest.raises(DataError, match=r"^data\[1\] is a DataLoader: pass its map-style dataset") as excinfo:
        as_bundle((tensor_data(), DataLoader(train)))
    one_line(excinfo)
    with pytest.raises(DataError, match="expect \\(1, 5, 5\\)"):  # a hand-made spec that does not fit
        check_bundle(dataclasses.replace(bundle, spec=dataclasses.replace(bundle.spec, image_size=5)))


@pytest.mark.parametrize("data, expected", [
    (type("Stream", (IterableDataset,), {"__iter__": lambda self: iter([])})(),
     r"data is an IterableDataset \(Stream\): pass a map-style dataset"),
    (torch.zeros(4, 1, 2, 2), "data is a tensor: pass a dataset of"),
])
def test_loaders_and_iterable_datasets_are_refused(data, expected):
    with pytest.raises(DataError, match=expected) as excinfo:
        as_bundle(data)
    one_line(excinfo)
    with pytest.raises(DataError, match=r"^data\[1\] is a"):  # a test split too
        as_bundle((tensor_data(), data))


def test_non_square_images_and_missing_test_splits_are_refused():
    data = TensorDataset(torch.zeros(4, 1, 6, 5), torch.arange(4))
    with pytest.raises(DataError, match=r"shape \(1, 6, 5\): images must be square") as excinfo:
        as_bundle(data)
    one_line(excinfo)
    with pytest.raises(DataError, match=r"^data has no test split: pass \(train_dataset, test_dataset\)"):
        as_bundle(tensor_data(), require_test=True)
    with pytest.raises(DataError, match="no test split"):
        as_bundle(as_bundle(tensor_data()), require_test=True)


def test_check_bundle_refuses_a_spec_with_the_wrong_in_channels():
    data = tensor_data(channels=1, size=6)
    spec = DataSpec(name="hand-made", num_classes=4, in_channels=3, image_size=6, mean=(0.0,) * 3,
                    std=(1.0,) * 3, class_names=tuple("abcd"))
    with pytest.raises(DataError, match=r"^item 0 of bundle.train is an image of shape \(1, 6, 6\), but "
                                        r"spec.in_channels=3 and spec.image_size=6 expect \(3, 6, 6\)") as excinfo:
        check_bundle(DataBundle(train=data, test=None, spec=spec))
    one_line(excinfo)
    with pytest.raises(DataError, match="bundle.test"):  # the test split is checked too
        check_bundle(DataBundle(train=tensor_data(channels=3), test=data, spec=spec))
    uint8 = TensorDataset(torch.zeros(4, 3, 6, 6, dtype=torch.uint8), torch.arange(4))
    with pytest.raises(DataError, match="torch.uint8 image: the models take floating images"):
        check_bundle(DataBundle(train=uint8, test=None, spec=spec))
    fixed = check_bundle(DataBundle(train=tensor_data(channels=3), test=None, spec=spec))
    assert isinstance(fixed.train, LabelledDataset)  # a raw TensorDataset gets its labels
    assert as_bundle(fixed) is fixed


def test_labels_out_of_range_are_refused():
    with pytest.raises(DataError, match=r"has labels from 0 to 3, outside \[0, num_classes=2\)") as excinfo:
        as_bundle(tensor_data(classes=4), num_classes=2)
    one_line(excinfo)
    with pytest.raises(DataError, match=r"labels from -1 to 1"):
        as_bundle(Plain(label_offset=-1))
    # the test split's labels are checked against the classes the training set implies
    with pytest.raises(DataError, match=r"bundle.test has labels from 0 to 5, outside \[0, num_classes=4\)"):
        as_bundle((tensor_data(classes=4), tensor_data(classes=6)))
    with pytest.raises(DataError, match="has dtype torch.float32: pass integer class indices"):
        as_bundle(TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4)))


def test_split_train_val_stratifies_the_wrapped_dataset_and_copies_keep_epochs_apart():
    data = tensor_data(n=80, classes=4)
    bundle = as_bundle(data)
    train, val = split_train_val(bundle.train, 0.25, seed=3)
    assert len(train) == 60 and len(val) == 20
    assert torch.bincount(val.labels).tolist() == [5, 5, 5, 5]
    assert torch.equal(torch.sort(torch.cat([train.indices, val.indices])).values, torch.arange(80))
    image, label = val[0]
    index = int(val.indices[0])
    assert torch.equal(image, data.tensors[0][index]) and label == int(data.tensors[1][index])

    wrapped = LabelledDataset(Epoched())
    first, second = split_train_val(wrapped, 0.5, seed=0)
    first.set_epoch(3)
    assert first.base.base.epoch == 3 and second.base.base.epoch == 0 and wrapped.base.epoch == 0
    clone = pickle.loads(pickle.dumps(wrapped))
    assert torch.equal(clone.labels, wrapped.labels) and copy.copy(wrapped).labels is wrapped.labels


def test_loader_workers_yield_the_batches_of_the_main_process():
    bundle = as_bundle(tensor_data(n=48, channels=2, size=4))

    def batches(workers: int) -> list:
        return list(make_loader(bundle.train, 8, train=True, seed=4, epoch=1, num_workers=workers))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 6
    for (images_a, labels_a), (images_b, labels_b) in zip(serial, parallel, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
        assert labels_a.dtype == torch.int64 and images_a.shape == (8, 2, 4, 4)


def test_data_on_device_falls_back_to_the_loader_for_a_users_dataset():
    _, val = split_train_val(as_bundle(tensor_data(n=40)).train, 0.25, seed=0)
    for dataset in (as_bundle(tensor_data()).train, val):
        assert data_on_device("auto", dataset, torch.device("cuda")) is None  # never placed, even on a GPU
        assert data_on_device("off", dataset, CPU) is None
        with pytest.raises(DataError, match=r"^--data-on-device on needs an in-memory dataset .*: pass auto or off$"):
            data_on_device("on", dataset, CPU)
    assert data_on_device("on", None, CPU) is None  # a bundle without a test split
    assert isinstance(data_on_device("on", load_data("digits").train, CPU), DeviceImages)


def test_describe_records_the_data_and_its_augmentation():
    assert describe(load_data("digits", padding=1)) == {"data": "digits", "augment": True}
    assert describe(load_data("digits", augment=False)) == {"data": "digits", "augment": False}
    assert describe(load_data("digits")) == {"data": "digits", "augment": False}  # its default does nothing
    own = load_data("digits", padding=1)
    search_train, _ = split_train_val(own.train, 0.5, seed=0)
    assert describe(DataBundle(train=search_train, test=own.test, spec=own.spec))["augment"] is True
    assert describe(as_bundle(tensor_data(), name="my-digits")) == {"data": "my-digits", "augment": None}
    # the package's own datasets pass through as they are (labels, seeded augmentation)
    assert as_bundle((own.train, own.test)).train is own.train


def test_infer_spec_alone():
    spec = infer_spec(Plain(size=3), name="plain", num_classes=7)
    assert (spec.name, spec.num_classes, spec.in_channels, spec.image_size) == ("plain", 7, 2, 3)
    assert spec.class_names == tuple(str(i) for i in range(7))
    with pytest.raises(DataError, match=r"shape \(6, 6\): images must be \[C, H, W\] tensors"):
        infer_spec(TensorDataset(torch.zeros(4, 6, 6), torch.arange(4)))
