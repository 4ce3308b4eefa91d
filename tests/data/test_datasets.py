"""Datasets by name (crate.data.open_split): the digits of the transfer experiment, timm's factory on
data it reads offline (torchvision's Fashion-MNIST reader over the Debian package's files, an image
folder), the torchvision sets, and the errors for a missing dataset: nothing is downloaded here. The
Fashion-MNIST IDX files of the Debian package (read, missing, corrupt), augmentation seeded by epoch and
index in any worker order, and corrupt images skipped by name."""

import gzip
import logging
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from crate.data import (
    Digits,
    FashionMNIST,
    ImageFolderSkippingCorrupt,
    InMemoryImages,
    ResumableSampler,
    SeededSamples,
    class_count,
    collate_skipping_none,
    fashion_mnist_root,
    open_split,
    prepare,
    read_idx,
    sample,
)
from crate.data.builtin import digits_split
from crate.data.datasets import DEFAULT_DATA_ROOT


# -- digits -----------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = Digits("train"), Digits("test")
    assert (len(train), len(test)) == (1258, 539)  # 30% of each class held out
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    counts = torch.bincount(test.targets, minlength=10)
    assert counts.min() >= 52 and counts.max() <= 55
    targets = torch.from_numpy(load_digits().target)
    train_indices, test_indices = digits_split(targets, "train"), digits_split(targets, "test")
    assert not set(train_indices.tolist()) & set(test_indices.tolist())
    assert len(train_indices) + len(test_indices) == 1797
    assert torch.equal(Digits("test").images, test.images)  # the same split every time


def test_few_labels_per_class_are_drawn_by_the_seed():
    ten = Digits("train", labels_per_class=10, subset_seed=0)
    assert len(ten) == 100 and torch.bincount(ten.targets).tolist() == [10] * 10
    assert torch.equal(ten.images, Digits("train", 10, subset_seed=0).images)
    assert not torch.equal(ten.images, Digits("train", 10, subset_seed=1).images)
    with pytest.raises(ValueError, match=r"labels_per_class=500, but class 0 has \d+ training images"):
        Digits("train", labels_per_class=500)


def test_digits_items_are_normalised_with_the_models_statistics():
    test = open_split("digits", None, "validation", training=False)
    prepare(test, None, (0.2860,), (0.3530,), channels=1)
    image, label = test[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    assert image.min() == pytest.approx(-0.2860 / 0.3530, abs=1e-6)  # the black background
    with pytest.raises(ValueError, match="1-channel images; the model reads 3 channels"):
        prepare(test, None, (0.5,) * 3, (0.5,) * 3, channels=3)


# -- timm's factory and torchvision, offline ----------------------------------------------------------------
def test_timm_names_read_a_torchvision_dataset_from_local_files(tmp_path):
    """torch/fashion_mnist through timm's factory: torchvision's reader over the Debian package's IDX
    files, unpacked where torchvision looks for them."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in fashion_mnist_root().iterdir():
        target = raw / path.name.removesuffix(".gz")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    test = open_split("torch/fashion_mnist", tmp_path, "validation", training=False)
    assert len(test) == 10_000 and class_count(test) == 10
    prepare(test, lambda image: torch.from_numpy(np.array(image)), (0.5,), (0.5,), 1)
    assert test[0][0].shape == (28, 28) and torch.equal(test[0][0], FashionMNIST(split="test").images[0, 0])


def test_an_image_folder_is_read_by_timm(tmp_path):
    for split in ("train", "validation"):
        for label in ("cat", "dog", "eel"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (20, 16), color=(index * 90, 40, 200)).save(folder / f"{index}.png")
    train = open_split("folder", tmp_path, "train", training=True)
    assert len(train) == 6 and class_count(train) == 3
    train.transform = lambda image: image.size
    assert train[0][0] == (20, 16)


@pytest.mark.parametrize(
    "name", ["torch/cifar10", "torch/cifar100", "torchvision/flowers102", "torchvision/oxford_iiit_pet"]
)
def test_a_missing_dataset_says_where_it_looked_and_how_to_fix_it(tmp_path, name):
    with pytest.raises(FileNotFoundError) as info:
        open_split(name, tmp_path / "nothing", "train", training=True)
    message = str(info.value)
    assert str(tmp_path / "nothing") in message and "--download" in message and "--data" in message


def test_named_datasets_default_to_a_folder_under_data():
    with pytest.raises(FileNotFoundError, match=r"data/torch-cifar10"):
        open_split("torch/cifar10", None, "train", training=True)
    assert DEFAULT_DATA_ROOT.name == "data"


def test_an_unknown_name_lists_what_is_known():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10': use one of fashion-mnist, digits"):
        open_split("cifar10", None, "train", training=True)


# -- streamed shards (webdataset), through timm and through training -------------------------------------
def _webdataset(root, classes: int = 3, per_split: int = 24):
    """Tiny webdataset shards (key.jpg + key.cls) and timm's _info.json for a train and a validation split."""
    import io
    import json
    import tarfile

    generator = torch.Generator().manual_seed(0)
    splits = {}
    for split in ("train", "validation"):
        name = f"tiny-{split}-000000.tar"
        with tarfile.open(root / name, "w") as shard:
            for index in range(per_split):
                label = index % classes
                pixels = (torch.rand(28, 28, 3, generator=generator) * 80 + 60 * label).to(torch.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
                for suffix, payload in (("jpg", buffer.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{split}{index:05d}.{suffix}")
                    info.size = len(payload)
                    shard.addfile(info, io.BytesIO(payload))
        splits[split] = dict(name=split, num_samples=per_split, filenames=[name], shard_lengths=[per_split])
    (root / "_info.json").write_text(json.dumps(dict(name="tiny", splits=splits)))
    return root


def test_webdataset_shards_stream_through_timm(tmp_path):
    pytest.importorskip("webdataset")
    root = _webdataset(tmp_path)
    stream = open_split("wds/tiny", root, "train", training=True)
    assert isinstance(stream, torch.utils.data.IterableDataset) and len(stream) == 24
    assert class_count(stream) is None  # a stream declares no classes: --num-classes says how many
    prepare(stream, lambda image: torch.tensor(image.size), (0.5,), (0.5,), channels=3)
    sizes_and_labels = list(stream)
    assert len(sizes_and_labels) == 24 and {int(label) for _, label in sizes_and_labels} == {0, 1, 2}


def test_training_on_streamed_shards(tmp_path):
    pytest.importorskip("webdataset")
    from crate.train import resolve_config, train

    (tmp_path / "shards").mkdir()
    root = _webdataset(tmp_path / "shards")
    options = ["--dataset", "wds/tiny", "--data", str(root), "--num-classes", "3", "--epochs", "2"]
    options += [
        "--batch-size",
        "8",
        "--lr-batch",
        "8",
        "--telemetry-batch",
        "4",
        "--output",
        str(tmp_path / "run"),
    ]
    result = train(resolve_config(options))
    assert result["step"] == 6 and result["eval_images"] == 24  # 24 images, 3 steps an epoch


# -- Fashion-MNIST files, seeded samples, corrupt images -----------------------------------------------------
def test_fashion_mnist_is_read_from_the_debian_package_files():
    train_set, test_set = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert len(train_set) == 60_000 and len(test_set) == 10_000
    image, label = test_set[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.bincount(train_set.targets).tolist() == [6000] * 10


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CRATE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*apt-get install dataset-fashion-mnist"):
        fashion_mnist_root()


def test_corrupt_idx_file_is_named(tmp_path):
    source = fashion_mnist_root() / "t10k-labels-idx1-ubyte.gz"
    truncated = tmp_path / "t10k-labels-idx1-ubyte"
    truncated.write_bytes(gzip.decompress(source.read_bytes())[:-10])
    with pytest.raises(ValueError, match=rf"{truncated} is truncated or corrupt"):
        read_idx(truncated)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(garbage)


def test_augmentation_depends_only_on_seed_epoch_and_index():
    dataset = FashionMNIST(split="test", augment=True, shift=2, seed=3)
    first = dataset[5][0]
    assert torch.equal(first, dataset[5][0])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[5][0])


class _RandomDraws(torch.utils.data.Dataset):
    """Items drawn from all three RNGs a transform may use."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()])


def test_seeded_samples_augment_alike_in_any_worker_order_or_resumed_run():
    dataset = SeededSamples(_RandomDraws(), seed=3)
    whole = torch.cat(list(DataLoader(dataset, 2, num_workers=2)))
    resumed = torch.cat(list(DataLoader(dataset, 2, num_workers=2, sampler=range(6, 12))))  # other workers
    assert torch.equal(resumed, whole[6:]) and len(whole.unique()) == 36
    state = torch.get_rng_state()
    assert torch.equal(dataset[0], whole[0]) and torch.equal(torch.get_rng_state(), state)  # restored
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0], whole[0])


def test_flip_probability_zero_never_flips_and_one_always_flips():
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 1, 3, 4)
    plain = InMemoryImages(images, torch.tensor([0, 1]), ("a", "b"))
    for hflip, expected in ((0.0, lambda image: image), (1.0, lambda image: image.flip(-1))):
        flipping = InMemoryImages(images, torch.tensor([0, 1]), ("a", "b"), augment=True, hflip=hflip)
        for epoch in range(3):
            flipping.set_epoch(epoch)
            for index in range(2):
                assert torch.equal(flipping[index][0], expected(plain[index][0])), (hflip, epoch, index)


def test_resumable_sampler_starts_at_its_batch_of_each_epochs_permutation():
    """Started at batch b, an epoch's order is the uninterrupted order from batch b on (so a resumed run
    sees exactly the batches left); each epoch its own permutation; the ragged tail dropped; the ranks
    disjoint."""
    dataset, batch = range(50), 4  # 25 indices per rank: 6 whole batches, one index dropped
    orders = {}
    for rank in (0, 1):
        sampler = ResumableSampler(dataset, rank, world_size=2, seed=5, batch_per_rank=batch)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            whole = list(sampler)
            assert len(whole) == len(sampler) == 24
            orders[rank, epoch] = whole
            for start in (1, 4, 6):
                sampler.set_epoch(epoch, start)
                assert list(sampler) == whole[start * batch :] and len(sampler) == len(whole) - start * batch
    assert orders[0, 0] != orders[0, 1]
    assert not set(orders[0, 0]) & set(orders[1, 0])


def test_corrupt_image_is_skipped_and_named(tmp_path, caplog):
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), color=(10, 20, 30)).save(tmp_path / label / "good.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    dataset = ImageFolderSkippingCorrupt(tmp_path, transform=pil_to_tensor)
    batch = collate_skipping_none([dataset[i] for i in range(len(dataset))])
    assert len(batch[1]) == 2
    assert dataset.skipped == [str(tmp_path / "b" / "broken.png")]
    assert "broken.png" in caplog.text


def _folder_with_a_corrupt_image(root, per_class: int = 6):
    """root/<a,b>/: 2 × ``per_class`` readable PNG and JPEG images (class-sorted), each of its own size
    (8 + index, 8 + class), and a/5-broken.jpg: a JPEG header and nothing else. Returns its path."""
    for label, height in (("a", 8), ("b", 9)):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            suffix = "png" if index % 2 else "jpg"
            Image.new("RGB", (8 + index, height), color=(90, 40, 200)).save(
                root / label / f"{index}.{suffix}"
            )
    broken = root / "a" / "5-broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return broken


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_of_a_training_folder_is_skipped_not_replaced(tmp_path, capfd, workers):
    """--dataset folder as training reads it (seeded samples, the trainer's collate): over two epochs
    every readable image comes once per epoch, the broken one never and no other in its place, and its
    path is logged once, with DataLoader workers too (timm's ImageDataset gave the next image instead,
    logging an index)."""
    broken = _folder_with_a_corrupt_image(tmp_path)
    to_stderr = logging.StreamHandler(sys.stderr)  # as a run's log: a worker writes its own lines
    logging.getLogger("crate.data").addHandler(to_stderr)
    try:
        train = open_split("folder", tmp_path, "train", training=True)
        assert len(train) == 13 and class_count(train) == 2
        prepare(train, lambda image: torch.tensor(image.size), (0.5,), (0.5,), channels=3)
        seeded = SeededSamples(train, seed=0)
        loader = DataLoader(seeded, 13, num_workers=workers, collate_fn=collate_skipping_none)
        for epoch in range(2):
            seeded.set_epoch(epoch)
            (images, targets), *rest = list(loader)
            assert not rest and len(targets) == 12
            sizes = sorted(tuple(size) for size in images.tolist())  # each image once
            assert sizes == sorted((8 + index, height) for height in (8, 9) for index in range(6))
    finally:
        logging.getLogger("crate.data").removeHandler(to_stderr)
    assert train.skipped == [str(broken)]
    assert capfd.readouterr().err.count(f"skipping unreadable image {broken}") == 1


def test_a_sample_is_seeded_and_spread_over_a_class_sorted_folder():
    dataset = list(range(100))  # any sized dataset: 50 of class 0, then 50 of class 1
    first, again, other = (sample(dataset, 10, seed) for seed in (0, 0, 1))
    assert list(first) == list(again) != list(other)
    assert list(first) == sorted(first) and len(set(first)) == 10
    assert 0 < sum(index >= 50 for index in first) < 10
    assert sample(dataset, 100, 0) is dataset
