"""Datasets by name (crate.data.open_split): the digits of the transfer experiment, timm's factory on
data it reads offline (torchvision's Fashion-MNIST reader over the Debian package's files, an image
folder), the torchvision sets, and the errors for a missing dataset: nothing is downloaded here."""

import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from crate.data import Digits, FashionMNIST, class_count, fashion_mnist_root, open_split, prepare
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
