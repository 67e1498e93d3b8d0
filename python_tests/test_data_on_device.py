"""Data on the training device (``--data-on-device``): the batches built from the pixels held on
the device are bitwise the loader's (same order, crops, flips and normalisation), in every epoch,
rank and resume position; trainers give the same weights either way."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from dfa_ext import models
from dfa_ext.data import Augment, load_data, make_loader
from dfa_ext.data.device_batches import DeviceImages, data_on_device
from dfa_ext.data.loader import batch_stream
from dfa_ext.data.split import split_train_val
from dfa_ext.data.tensor_dataset import ImageTensorDataset
from dfa_ext.data.transforms import Preprocess
from dfa_ext.errors import DataError
from dfa_ext.search import SearchConfig, run_search
from dfa_ext.training import TeacherConfig, load_checkpoint, train_teacher
from dfa_ext.training.checkpoint import model_record, save_checkpoint

CPU = torch.device("cpu")


def _cifar_like(n: int = 400, size: int = 10) -> ImageTensorDataset:
    """uint8 RGB images with CIFAR's augmentation (pad-4 crop, flips): crops reach the padding."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    preprocess = Preprocess((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), Augment(padding=4, flip=True), seed=7)
    return ImageTensorDataset(images, labels, preprocess)


def _datasets() -> dict:
    digits = load_data("digits", seed=3, padding=1, flip=True)  # float pixels in [0, 1], 1 channel
    mnist14 = load_data("mnist", seed=2, image_size=14)          # float pixels (2x2 means), pad-2 crops
    cifar = _cifar_like()
    return {"digits": digits.train, "digits-test": digits.test, "mnist-14": mnist14.train, "cifar-like": cifar,
            "search-train": split_train_val(digits.train, 0.3, seed=4)[0],
            "subset-of-subset": split_train_val(split_train_val(cifar, 0.4, seed=1)[1], 0.5, seed=2)[0]}


DATASETS = _datasets()


def _assert_same_batches(expected, got) -> None:
    expected, got = list(expected), list(got)
    assert len(got) == len(expected) > 0
    for (images, labels), (dev_images, dev_labels) in zip(expected, got):
        assert dev_images.dtype == torch.float32 and dev_labels.dtype == torch.int64
        assert torch.equal(dev_images, images) and torch.equal(dev_labels, labels)


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("train, epoch, start_batch, rank, world_size, batch_size", [
    (True, 0, 0, 0, 1, 32),
    (True, 3, 1, 1, 2, 16),    # another epoch, resumed mid-epoch, rank 1 of 2
    (True, 1, 0, 2, 3, 7),     # three processes, a batch that does not divide the data
    (False, 0, 0, 0, 1, 40),   # evaluation: identity order, the last partial batch kept
    (False, 0, 0, 1, 2, 33),
])
def test_device_batches_are_the_loaders(name, train, epoch, start_batch, rank, world_size, batch_size):
    dataset = DATASETS[name]
    kwargs = dict(train=train, seed=5, epoch=epoch, start_batch=start_batch, rank=rank, world_size=world_size)
    on_device = DeviceImages(dataset, CPU)
    _assert_same_batches(make_loader(dataset, batch_size, **kwargs),
                         make_loader(dataset, batch_size, on_device=on_device, **kwargs))


def test_device_stream_is_the_loaders_across_epochs_and_a_resume():
    dataset = DATASETS["search-train"]
    on_device = DeviceImages(dataset, CPU)
    for start in (0, 17):  # 880 images in batches of 64: 13 steps an epoch, so both cross epochs
        loader = batch_stream(dataset, 64, seed=4, start_step=start)
        device = batch_stream(dataset, 64, seed=4, start_step=start, on_device=on_device)
        _assert_same_batches([next(loader) for _ in range(30)], [next(device) for _ in range(30)])


def test_augmentation_is_really_applied_on_the_device():
    # The equality above would also hold if neither path augmented: the device batch must differ
    # from the plain normalised pixels, and between epochs, while the test split never does.
    dataset = DATASETS["cifar-like"]
    on_device = DeviceImages(dataset, CPU)
    index = torch.arange(32)
    epoch0, _ = on_device.batch(index, 0)
    epoch1, _ = on_device.batch(index, 1)
    pre = dataset.preprocess
    plain = torch.addcmul(pre.shift, dataset.images[:32].float(), pre.scale_uint8)
    assert not torch.equal(epoch0, plain) and not torch.equal(epoch0, epoch1)
    changed = (epoch0 != plain).flatten(1).any(dim=1).float().mean()
    assert changed > 0.8  # 81 offsets and a flip: an item keeps its pixels with probability 1/162
    test = DATASETS["digits-test"]
    test_images, _ = DeviceImages(test, CPU).batch(torch.arange(20), 5)
    assert torch.equal(test_images, torch.stack([test[i][0] for i in range(20)]))


def test_the_search_splits_share_one_copy_of_the_pixels_and_still_give_their_own_batches():
    """Both splits of the search are subsets of one dataset: their device images are one padded
    tensor (not a copy each), while each split still yields the loader's batches of its items."""
    base = _cifar_like()
    train, val = split_train_val(base, 0.4, seed=1)
    a, b = DeviceImages(train, torch.device("cpu")), DeviceImages(val, torch.device("cpu"))
    assert a.pixels.data_ptr() == b.pixels.data_ptr() and a.labels.data_ptr() == b.labels.data_ptr()
    assert DeviceImages(_cifar_like(), torch.device("cpu")).pixels.data_ptr() != a.pixels.data_ptr()
    assert pickle.loads(pickle.dumps(train)).base.device_copies == {}  # loader workers get no device copies
    for split, images in ((train, a), (val, b)):
        _assert_same_batches(make_loader(split, 16, train=True, seed=5, epoch=2),
                             make_loader(split, 16, train=True, seed=5, epoch=2, on_device=images))


def test_modes_choose_the_device_path_only_where_it_applies(tmp_path):
    digits = DATASETS["digits"]
    assert data_on_device("off", digits, CPU) is None
    assert data_on_device("auto", digits, CPU) is None  # the CPU keeps the loader (bench_epoch.py)
    assert isinstance(data_on_device("on", digits, CPU), DeviceImages)
    for split in ("train", "test"):
        for folder in ("a", "b"):
            (tmp_path / split / folder).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 40, 90 - i * 30, 20 + i * 50)).save(tmp_path / split / folder / f"{i}.png")
    images = load_data("imagefolder", tmp_path, image_size=8).train
    assert data_on_device("auto", images, CPU) is None
    with pytest.raises(DataError, match="^--data-on-device on needs an in-memory dataset"):
        data_on_device("on", images, CPU)
    with pytest.raises(DataError, match="data_on_device must be one of auto, on, off, got 'yes'"):
        data_on_device("yes", digits, CPU)


def test_teacher_training_gives_the_same_weights_with_data_on_the_device(tmp_path):
    def run(mode: str):
        config = TeacherConfig(model="resnet8", data="digits", data_options={"padding": 1, "flip": True},
                               epochs=2, batch_size=64, lr=0.05, seed=11, progress=False, tensorboard=False,
                               data_on_device=mode, out=str(tmp_path / mode))
        return train_teacher(config), load_checkpoint(tmp_path / mode / "last.pt")

    (off, off_state), (on, on_state) = run("off"), run("on")
    assert on.last_top1 == off.last_top1 and on.best_top1 == off.best_top1
    for key, value in off_state["model"]["state_dict"].items():
        assert torch.equal(on_state["model"]["state_dict"][key], value), key


def test_search_finds_the_same_beta_with_data_on_the_device(tmp_path):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, {"kind": "teacher", "model": model_record(
        models.create("resnet14", num_classes=10, in_channels=1), "resnet14", 10, 1)})

    def betas(mode: str):
        config = SearchConfig(teacher=str(teacher), student="resnet8", data="digits", steps_per_group=4,
                              batch_size=32, arch_lr=0.05, seed=5, progress=False, data_on_device=mode,
                              data_options={"padding": 1, "flip": True}, val_fraction=0.3,
                              out=str(tmp_path / mode))
        run_search(config)
        return load_checkpoint(tmp_path / mode / "last.pt")["betas"]

    for on, off in zip(betas("on"), betas("off"), strict=True):
        assert torch.equal(on, off)


def test_unknown_mode_is_refused_when_the_config_is_checked():
    from dfa_ext.errors import ConfigError

    with pytest.raises(ConfigError, match="data_on_device must be one of auto, on, off, got 'gpu'"):
        TeacherConfig(data_on_device="gpu").validate()
