"""Tests of `bitnet_jax.data`, through `run_config` as the trainer calls it, on miniature datasets.

The fixtures write tiny copies of the real distributed layouts (CIFAR python pickles, IDX files,
Tiny-ImageNet folders) into tmp_path; TFDS is exercised with `tfds.testing.mock_data`, without
network or TensorFlow (tests/test_prepare.py prepares and reads a real TFDS dataset). Datasets
built with `_id_npz` encode each example's id in its pixels (channel 0 = id // 256, channel 1 =
id % 256, everywhere), so tests can tell which examples a batch holds even after crop_flip (the
centre pixel always comes from the image).
"""

import gzip
import json
import os
import pickle
import subprocess
import sys
import textwrap

import grain
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bitnet_jax import run_config
from bitnet_jax.data import cifar
from bitnet_jax.data import pipeline
from bitnet_jax.data import registry
from bitnet_jax.data import synthetic
from bitnet_jax.data import tiny_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      dataset="synthetic", data_dir="", seed=0, batch_size=8, eval_batch_size=8,
      augment="none", max_train_examples=-1, max_eval_examples=-1, num_workers=0,
      synthetic_num_train=64, synthetic_num_test=20, synthetic_num_classes=4,
      synthetic_image_shape=(32, 32, 3)))
  config.update(overrides)
  return config


# ------------------------------------------------------------------------------------------
# Fixture writers: miniature copies of the distributed layouts.


def _cifar_images(n: int, rng) -> np.ndarray:
  return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # (N, 3072), CHW rows


def _write_pickle(path, obj) -> None:
  """Like the originals: protocol 2, bytes keys, arrays under NumPy 1's module name."""
  data = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n",
                                               b"cnumpy.core.multiarray\n")
  with open(path, "wb") as f:
    f.write(data)


def write_cifar10(parent, n_per_batch=6, n_test=5) -> str:
  folder = os.path.join(parent, "cifar-10-batches-py")
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch",
                                                                             n_test)]:
    _write_pickle(os.path.join(folder, name), {
        b"batch_label": b"x", b"data": _cifar_images(n, rng),
        b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"a.png"] * n})
  return folder


def write_cifar100(parent, n_train=7, n_test=4) -> str:
  folder = os.path.join(parent, "cifar-100-python")
  os.makedirs(folder)
  rng = np.random.default_rng(1)
  for name, n in (("train", n_train), ("test", n_test)):
    _write_pickle(os.path.join(folder, name), {
        b"data": _cifar_images(n, rng), b"fine_labels": [99] + [0] * (n - 1),
        b"coarse_labels": [0] * n})
  return folder


def idx_bytes(array: np.ndarray) -> bytes:
  """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian dims, data."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, gz: bool, n_train=9, n_test=4) -> dict:
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(2)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    arrays[f"{prefix}-labels-idx1-ubyte"] = np.arange(n, dtype=np.uint8) % 10
  for name, array in arrays.items():
    data = idx_bytes(array)
    if gz:
      with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
        f.write(data)
    else:
      with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
  return arrays


def write_tiny_imagenet(parent, wnids=("n02", "n01", "n03"), per_class=3) -> str:
  """Classes in wnids.txt order (deliberately unsorted); val image 1 is grayscale."""
  root = os.path.join(parent, "tiny-imagenet-200")
  rng = np.random.default_rng(3)
  os.makedirs(os.path.join(root, "val", "images"))
  with open(os.path.join(root, "wnids.txt"), "w") as f:
    f.write("\n".join(wnids) + "\n")
  for wnid in wnids:
    folder = os.path.join(root, "train", wnid, "images")
    os.makedirs(folder)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
          os.path.join(folder, f"{wnid}_{i}.JPEG"))
  lines = []
  for i, wnid in enumerate([wnids[2], wnids[0], wnids[1], wnids[0]]):
    name = f"val_{i}.JPEG"
    shape = (64, 64) if i == 1 else (64, 64, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
        os.path.join(root, "val", "images", name))
    lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
  with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return root


def id_images(n: int, shape=(32, 32, 3), seed=0) -> np.ndarray:
  """Images whose channels 0/1 hold id // 256 and id % 256; channel 2 is noise."""
  ids = np.arange(n)
  x = np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)
  x[..., 0] = (ids // 256)[:, None, None]
  x[..., 1] = (ids % 256)[:, None, None]
  return x


def decode_ids(images: np.ndarray) -> np.ndarray:
  h, w = images.shape[1] // 2, images.shape[2] // 2
  return images[:, h, w, 0].astype(np.int64) * 256 + images[:, h, w, 1]


def _id_npz(tmp_path, n_train=50, n_test=37, num_classes=10, name="ids.npz") -> str:
  path = str(tmp_path / name)
  np.savez(path, x_train=id_images(n_train), y_train=np.arange(n_train) % num_classes,
           x_test=id_images(n_test, seed=1), y_test=np.arange(n_test) % num_classes)
  return path


def _check_split(source, n, shape, num_classes):
  images, labels = source.read(np.arange(len(source)))
  assert len(source) == n
  assert images.shape == (n,) + shape and images.dtype == np.uint8
  assert labels.shape == (n,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < num_classes
  return images, labels


# ------------------------------------------------------------------------------------------
# Sources.


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_local(tmp_path, point_at_folder):
  folder = write_cifar10(str(tmp_path))
  config = _config(dataset="cifar10", data_dir=folder if point_at_folder else str(tmp_path))
  info = run_config.dataset_info(config)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
      10, (32, 32, 3), 30, 5)
  assert info.mean == cifar.MEAN and info.std == cifar.STD
  images, labels = _check_split(run_config.source(config, "train"), 30, (32, 32, 3), 10)
  with open(os.path.join(folder, "data_batch_2"), "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  # Example 0 of batch 2 is example 6: CHW rows become HWC images.
  np.testing.assert_array_equal(images[6], batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
  assert labels[6] == batch[b"labels"][0]
  _check_split(run_config.source(config, "test"), 5, (32, 32, 3), 10)


def test_cifar100_local_uses_fine_labels(tmp_path):
  write_cifar100(str(tmp_path))
  config = _config(dataset="cifar100", data_dir=str(tmp_path))
  info = run_config.dataset_info(config)
  assert (info.num_classes, info.num_train, info.num_test) == (100, 7, 4)
  _, labels = _check_split(run_config.source(config, "train"), 7, (32, 32, 3), 100)
  assert labels[0] == 99


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_local_is_padded_to_32(tmp_path, gz):
  arrays = write_mnist(str(tmp_path), gz=gz)
  config = _config(dataset="mnist", data_dir=str(tmp_path))
  info = run_config.dataset_info(config)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
      10, (32, 32, 1), 9, 4)
  images, labels = _check_split(run_config.source(config, "train"), 9, (32, 32, 1), 10)
  raw = arrays["train-images-idx3-ubyte"]
  np.testing.assert_array_equal(images[:, 2:30, 2:30, 0], raw)
  assert images[:, :2].max() == 0 and images[:, 30:].max() == 0
  assert images[:, :, :2].max() == 0 and images[:, :, 30:].max() == 0
  np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])
  # Mean/std of the original 28x28 pixels, before padding.
  np.testing.assert_allclose(info.mean, [raw.mean() / 255])
  np.testing.assert_allclose(info.std, [raw.std() / 255])


def test_tiny_imagenet(tmp_path):
  write_tiny_imagenet(str(tmp_path))
  for data_dir in (str(tmp_path), str(tmp_path / "tiny-imagenet-200")):
    config = _config(dataset="tiny_imagenet", data_dir=data_dir)
    info = run_config.dataset_info(config)
    assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
        200, (64, 64, 3), 9, 4)
    assert info.mean == tiny_imagenet.MEAN
  train = run_config.source(config, "train")
  _, labels = _check_split(train, 9, (64, 64, 3), 200)
  # Class index = line of wnids.txt (n02, n01, n03), not sorted order.
  assert [os.path.basename(train.paths[i])[:3] for i in (0, 3, 6)] == ["n02", "n01", "n03"]
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  images, labels = _check_split(run_config.source(config, "test"), 4, (64, 64, 3), 200)
  np.testing.assert_array_equal(labels, [2, 0, 1, 0])
  gray = images[1]  # stored as a grayscale JPEG: three equal channels
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_tiny_imagenet_info_does_not_decode(tmp_path, monkeypatch):
  write_tiny_imagenet(str(tmp_path))
  monkeypatch.setattr(tiny_imagenet.ImageFileSource, "_decode", lambda *_: pytest.fail("decoded"))
  assert run_config.dataset_info(_config(dataset="tiny_imagenet",
                                           data_dir=str(tmp_path))).num_train == 9


def test_npz(tmp_path):
  path = str(tmp_path / "gray.npz")
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (10, 32, 32), dtype=np.uint8),
           y_train=np.arange(10) % 3, x_test=np.zeros((4, 32, 32), np.uint8),
           y_test=np.array([0, 1, 2, 6]))
  config = _config(dataset="npz", data_dir=path)
  info = run_config.dataset_info(config)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
      7, (32, 32, 1), 10, 4)
  _check_split(run_config.source(config, "train"), 10, (32, 32, 1), 7)
  _check_split(run_config.source(config, "test"), 4, (32, 32, 1), 7)


def test_synthetic_is_seeded_and_learnable():
  config = _config(synthetic_num_train=200, synthetic_num_test=100, synthetic_num_classes=5,
                   synthetic_image_shape=(16, 16, 1))
  info = run_config.dataset_info(config)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
      5, (16, 16, 1), 200, 100)
  x, y = _check_split(run_config.source(config, "train"), 200, (16, 16, 1), 5)
  xt, yt = _check_split(run_config.source(config, "test"), 100, (16, 16, 1), 5)
  np.testing.assert_array_equal(np.bincount(y), [40] * 5)
  # Nearest class mean classifies the test split: the data are class-dependent.
  means = np.stack([x[y == c].mean(0) for c in range(5)]).reshape(5, -1)
  distances = ((xt.reshape(100, 1, -1) - means[None]) ** 2).sum(-1)
  assert (distances.argmin(1) == yt).mean() > 0.9
  np.testing.assert_array_equal(synthetic.make(200, 100, 5, (16, 16, 1))[0]["train"][0],
                                x)


@pytest.mark.parametrize("name, shape, num_classes", [
    ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100),
    ("mnist", (32, 32, 1), 10), ("fashion_mnist", (32, 32, 1), 10)])
def test_tfds_mock(name, shape, num_classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    config = _config(dataset=name, batch_size=4, eval_batch_size=8)
    info = run_config.dataset_info(config)
    assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
        num_classes, shape, 12, 12)
    assert len(info.mean) == shape[-1] and all(s > 0 for s in info.std)
    batch = next(run_config.train_iter(config, info))
    assert batch["image"].shape == (4,) + shape and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].max() < num_classes
    batches = list(run_config.eval_iter(config, info))
    assert len(batches) == 2 and sum(b["mask"].sum() for b in batches) == 12
    if shape[0] == 32 and shape[-1] == 1:
      assert batches[0]["image"][:, :2].max() == 0  # MNIST family: zero padding


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason=f"{FASHION_MNIST} not installed")
def test_real_fashion_mnist():
  info = run_config.dataset_info(_config(dataset="fashion_mnist", data_dir=FASHION_MNIST))
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
      10, (32, 32, 1), 60_000, 10_000)
  np.testing.assert_allclose(info.mean, [0.2860], atol=1e-4)
  np.testing.assert_allclose(info.std, [0.3530], atol=1e-4)


# ------------------------------------------------------------------------------------------
# Training order, resumption, augmentation.


def test_each_epoch_is_a_seeded_permutation(tmp_path):
  config = _config(dataset="npz", data_dir=_id_npz(tmp_path), batch_size=16)
  info = run_config.dataset_info(config)
  assert run_config.steps_per_epoch(config, info) == 3  # 50 // 16, remainder dropped
  it = run_config.train_iter(config, info)
  epochs = [np.concatenate([decode_ids(next(it)["image"]) for _ in range(3)]) for _ in range(2)]
  for ids in epochs:
    assert len(set(ids)) == 48 and ids.max() < 50
  assert not np.array_equal(epochs[0], epochs[1])
  again = run_config.train_iter(config, info)
  np.testing.assert_array_equal(decode_ids(next(again)["image"]), epochs[0][:16])
  other = run_config.train_iter(_config(**{**config.to_dict(), "seed": 1}), info)
  assert not np.array_equal(decode_ids(next(other)["image"]), epochs[0][:16])


def test_the_library_takes_plain_arguments(tmp_path):
  """The data package reads no config: a DataSpec and keyword arguments give what run_config
  gives for the same fields."""
  path = _id_npz(tmp_path)
  config = _config(dataset="npz", data_dir=path, batch_size=16, eval_batch_size=8, seed=3,
                   augment="crop_flip", max_train_examples=40, max_eval_examples=30)
  spec = registry.DataSpec("npz", data_dir=path)
  info = registry.get_dataset_info(spec)
  assert info == run_config.dataset_info(config)
  assert pipeline.steps_per_epoch(info, 16, max_examples=40) == 2
  got = pipeline.train_iter(registry.get_source(spec, "train"), info, batch_size=16, seed=3,
                            augment="crop_flip", max_examples=40)
  want = run_config.train_iter(config, info)
  for _ in range(3):
    np.testing.assert_array_equal(next(got)["image"], next(want)["image"])
  batches = list(pipeline.eval_iter(registry.get_source(spec, "test"), info, batch_size=8,
                                    max_examples=30))
  assert len(batches) == pipeline.num_eval_batches(info, 8, max_examples=30) == 4
  assert sum(b["mask"].sum() for b in batches) == 30


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_resume_yields_the_next_batch(tmp_path, augment):
  config = _config(dataset="npz", data_dir=_id_npz(tmp_path), batch_size=16, augment=augment)
  info = run_config.dataset_info(config)
  reference = run_config.train_iter(config, info)
  expected = [next(reference) for _ in range(8)]  # 3 steps per epoch: crosses two boundaries
  for stop in (2, 3, 4):  # just before, at and after the first epoch boundary
    it = run_config.train_iter(config, info)
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    resumed = run_config.train_iter(config, info)
    resumed.set_state(state)
    for want in expected[stop:stop + 3]:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_resume_through_grain_checkpoint_handler(tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  config = _config(batch_size=8)
  info = run_config.dataset_info(config)
  it = run_config.train_iter(config, info)
  for _ in range(9):
    next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  want = next(it)
  restored = handler.restore(epath.Path(tmp_path),
                             item=run_config.train_iter(config, info))
  np.testing.assert_array_equal(next(restored)["image"], want["image"])


def test_crop_flip_by_hand():
  images = np.array([[[1, 2], [3, 4]]], np.uint8)[..., None]  # (1, 2, 2, 1)
  out = pipeline.crop_flip(images, np.array([[0, 0]]), np.array([False]), pad=1)
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 0], [0, 1]])
  out = pipeline.crop_flip(images, np.array([[1, 2]]), np.array([True]), pad=1)
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 2], [0, 4]])  # crop [[2, 0], [4, 0]], flipped


@pytest.mark.parametrize("shape, pad", [((7, 5, 3), 2), ((32, 32, 1), 4), ((64, 64, 3), 8)])
def test_crop_flip_matches_pad_then_crop(shape, pad):
  rng = np.random.default_rng(0)
  corners = [(dy, dx) for dy in (0, pad, 2 * pad) for dx in (0, 1, 2 * pad)]  # extremes too
  n = 2 * len(corners)
  images = rng.integers(1, 256, (n,) + shape, dtype=np.uint8)
  offsets = np.array(corners * 2)
  flips = np.repeat([False, True], len(corners))
  out = pipeline.crop_flip(images, offsets, flips, pad)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
    crop = padded[i, dy:dy + shape[0], dx:dx + shape[1]]
    np.testing.assert_array_equal(out[i], crop[:, ::-1] if flip else crop)


def _is_crop_flip_of(image, original, pad):
  h, w, _ = original.shape
  padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
  return any(np.array_equal(image, crop[:, ::-1] if flip else crop)
             for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
             for crop in [padded[dy:dy + h, dx:dx + w]] for flip in (False, True))


def test_augment_none_and_crop_flip(tmp_path):
  path = _id_npz(tmp_path)
  x_train = np.load(path)["x_train"]
  plain = next(run_config.train_iter(_config(dataset="npz", data_dir=path,
                                                        batch_size=16)))
  np.testing.assert_array_equal(plain["image"], x_train[decode_ids(plain["image"])])

  config = _config(dataset="npz", data_dir=path, batch_size=16, augment="crop_flip")
  first = next(run_config.train_iter(config))
  second = next(run_config.train_iter(config))
  np.testing.assert_array_equal(first["image"], second["image"])  # seeded
  ids = decode_ids(first["image"])
  np.testing.assert_array_equal(ids, decode_ids(plain["image"]))  # same order as 'none'
  changed = [not np.array_equal(a, x_train[i]) for a, i in zip(first["image"], ids)]
  assert sum(changed) >= 12  # 1 in 162 (offset, flip) choices is the identity
  assert all(_is_crop_flip_of(a, x_train[i], pad=4) for a, i in zip(first["image"][:4], ids))
  other = next(run_config.train_iter(_config(**{**config.to_dict(), "seed": 5})))
  assert not np.array_equal(other["image"], first["image"])


def test_normalize():
  image = np.array([[[[0, 255, 51]]]], np.uint8)  # (1, 1, 1, 3)
  out = pipeline.normalize(image, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
  assert out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)


def test_max_examples_use_a_prefix(tmp_path):
  config = _config(dataset="npz", data_dir=_id_npz(tmp_path), batch_size=8, eval_batch_size=8,
                   max_train_examples=20, max_eval_examples=11)
  info = run_config.dataset_info(config)
  assert run_config.steps_per_epoch(config, info) == 2
  it = run_config.train_iter(config, info)
  assert set(np.concatenate([decode_ids(next(it)["image"]) for _ in range(10)])) <= set(range(20))
  batches = list(run_config.eval_iter(config, info))
  assert len(batches) == run_config.num_eval_batches(config, info) == 2
  ids = np.concatenate([decode_ids(b["image"])[b["mask"]] for b in batches])
  np.testing.assert_array_equal(ids, np.arange(11))


def test_num_workers_gives_the_same_batches(tmp_path):
  config = _config(dataset="npz", data_dir=_id_npz(tmp_path), batch_size=16, augment="crop_flip")
  info = run_config.dataset_info(config)
  want = [next(it) for it in [run_config.train_iter(config, info)] for _ in range(4)]
  it = run_config.train_iter(_config(**{**config.to_dict(), "num_workers": 1}), info)
  got = [next(it) for _ in range(4)]
  it.close()
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])


# ------------------------------------------------------------------------------------------
# Processes and devices.


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_eval_counts_every_example_once_one_device(tmp_path):
  config = _config(dataset="npz", data_dir=_id_npz(tmp_path), eval_batch_size=8)
  info = run_config.dataset_info(config)
  batches = list(run_config.eval_iter(config, info))
  assert len(batches) == run_config.num_eval_batches(config, info) == 5  # ceil(37 / 8)
  for b in batches:
    assert b["image"].shape == (8, 32, 32, 3) and b["mask"].dtype == bool
  mask = np.concatenate([b["mask"] for b in batches])
  ids = np.concatenate([decode_ids(b["image"]) for b in batches])[mask]
  assert mask.sum() == 37
  np.testing.assert_array_equal(np.sort(ids), np.arange(37))
  labels = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(labels, ids % 10)


def test_processes_split_the_global_batches(tmp_path, monkeypatch):
  config = _config(dataset="npz", data_dir=_id_npz(tmp_path), batch_size=16, eval_batch_size=8,
                   augment="crop_flip")
  info = run_config.dataset_info(config)
  one = run_config.train_iter(config, info)
  want = [next(one)["image"] for _ in range(4)]
  parts, seen = [], []
  for p in range(4):
    _as_process(monkeypatch, p, 4)
    it = run_config.train_iter(config, info)
    parts.append([next(it)["image"] for _ in range(4)])
    seen += [(i, ok) for b in run_config.eval_iter(config, info)
             for i, ok in zip(decode_ids(b["image"]), b["mask"])]
  for step in range(4):  # same global batch, augmentation included, whatever the process count
    np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), want[step])
  ids = [i for i, ok in seen if ok]
  assert sorted(ids) == list(range(37))


_EIGHT_DEVICES = textwrap.dedent('''
    import json, sys
    import jax, ml_collections, numpy as np
    from bitnet_jax import run_config, sharding
    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    config = ml_collections.ConfigDict(dict(
        dataset='npz', data_dir=sys.argv[1], seed=0, batch_size=16, eval_batch_size=24,
        augment='none', max_train_examples=-1, max_eval_examples=-1, num_workers=0))
    info = run_config.dataset_info(config)
    count_fn = jax.jit(lambda b: (b['mask'].sum(), (b['label'] * b['mask']).sum()))
    count = label_sum = 0
    ids = []
    for batch in run_config.eval_iter(config, info):
      sharded = sharding.shard_batch(batch, mesh)
      assert len(sharded['image'].addressable_shards) == 8
      assert sharded['image'].addressable_shards[0].data.shape == (3, 32, 32, 3)
      c, s = count_fn(sharded)
      count, label_sum = count + int(c), label_sum + int(s)
      image, mask = np.asarray(sharded['image']), np.asarray(sharded['mask'])
      ids += (image[:, 16, 16, 0].astype(int) * 256 + image[:, 16, 16, 1])[mask].tolist()
    train = sharding.shard_batch(next(run_config.train_iter(config, info)), mesh)
    errors = []
    try:
      sharding.shard_batch({'label': np.zeros(12, np.int32)}, mesh)
    except ValueError as e:
      errors.append(str(e))
    try:
      run_config.eval_iter(ml_collections.ConfigDict({**config, 'eval_batch_size': 12}))
    except ValueError as e:
      errors.append(str(e))
    print(json.dumps(dict(count=count, label_sum=label_sum, ids=ids,
                          train_shape=list(train['image'].shape), errors=errors)))
''')


def test_eval_counts_every_example_once_eight_devices(tmp_path):
  n = 101  # 5 global batches of 24, the last one with 5 examples and 19 padding rows
  path = _id_npz(tmp_path, n_test=n)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, path], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["count"] == n
  assert out["label_sum"] == sum(i % 10 for i in range(n))
  assert sorted(out["ids"]) == list(range(n))
  assert out["train_shape"] == [16, 32, 32, 3]
  assert "must be divisible by the 8 devices" in out["errors"][0]
  assert "must be divisible by the number of devices, 8" in out["errors"][1]


# ------------------------------------------------------------------------------------------
# Bad input fails early, naming the path and what was expected.


def test_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset 'cifar11'.*cifar10, cifar100, "):
    run_config.dataset_info(_config(dataset="cifar11"))


def test_missing_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"does not exist.*{tmp_path}/nope"):
    run_config.dataset_info(_config(dataset="cifar10", data_dir=str(tmp_path / "nope")))


def test_cifar_missing_batch(tmp_path):
  folder = write_cifar10(str(tmp_path))
  os.remove(os.path.join(folder, "data_batch_3"))
  with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py is missing .*'data_batch_3'"):
    run_config.dataset_info(_config(dataset="cifar10", data_dir=str(tmp_path)))


def test_cifar_truncated_pickle(tmp_path):
  folder = write_cifar10(str(tmp_path))
  path = os.path.join(folder, "data_batch_1")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match="Cannot read CIFAR batch .*data_batch_1"):
    run_config.dataset_info(_config(dataset="cifar10", data_dir=folder))


def test_cifar_pickle_missing_key(tmp_path):
  folder = write_cifar100(str(tmp_path))
  _write_pickle(os.path.join(folder, "test"), {b"data": _cifar_images(2, np.random.default_rng())})
  with pytest.raises(ValueError, match=r"cifar-100-python/test: CIFAR batch is missing keys "
                                       r"\['fine_labels'\]"):
    run_config.dataset_info(_config(dataset="cifar100", data_dir=str(tmp_path)))


class _Exploit:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
  folder = write_cifar10(str(tmp_path))
  _write_pickle(os.path.join(folder, "test_batch"), {b"data": _Exploit()})
  with pytest.raises(ValueError, match="test_batch.*refused global 'posix.system'.*nothing was "
                                       "executed"):
    run_config.dataset_info(_config(dataset="cifar10", data_dir=folder))


def test_cifar_labels_out_of_range(tmp_path):
  folder = write_cifar10(str(tmp_path))
  _write_pickle(os.path.join(folder, "test_batch"), {
      b"data": _cifar_images(2, np.random.default_rng()), b"labels": [3, 10]})
  with pytest.raises(ValueError, match=r"test_batch: labels must be in \[0, 10\), found \[3, 10\]"):
    run_config.dataset_info(_config(dataset="cifar10", data_dir=folder))


def test_idx_wrong_magic(tmp_path):
  write_mnist(str(tmp_path), gz=False)
  path = tmp_path / "t10k-labels-idx1-ubyte"
  path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])
  with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte is not an IDX file"):
    run_config.dataset_info(_config(dataset="mnist", data_dir=str(tmp_path)))


def test_idx_truncated(tmp_path):
  write_mnist(str(tmp_path), gz=True)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: IDX header says shape "
                                       r"\(9, 28, 28\).*truncated or corrupt"):
    run_config.dataset_info(_config(dataset="mnist", data_dir=str(tmp_path)))


def test_idx_corrupt_gzip(tmp_path):
  write_mnist(str(tmp_path), gz=True)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(path.read_bytes()[:15])
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*corrupt or truncated gzip"):
    run_config.dataset_info(_config(dataset="fashion_mnist", data_dir=str(tmp_path)))


def test_idx_missing_file(tmp_path):
  write_mnist(str(tmp_path), gz=True)
  os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(FileNotFoundError, match=r"missing \['t10k-images-idx3-ubyte\[.gz\]'\]"):
    run_config.dataset_info(_config(dataset="mnist", data_dir=str(tmp_path)))


def test_idx_labels_out_of_range(tmp_path):
  write_mnist(str(tmp_path), gz=False)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 12])))
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels must be in \[0, 10\)"):
    run_config.dataset_info(_config(dataset="mnist", data_dir=str(tmp_path)))


def test_tiny_imagenet_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"No Tiny-ImageNet folder at {tmp_path}"):
    run_config.dataset_info(_config(dataset="tiny_imagenet", data_dir=str(tmp_path)))


def test_tiny_imagenet_bad_annotation(tmp_path):
  root = write_tiny_imagenet(str(tmp_path))
  with open(os.path.join(root, "val", "val_annotations.txt"), "a") as f:
    f.write("val_9.JPEG\tn99\t0\t0\t1\t1\n")
  with pytest.raises(ValueError, match=r"val_annotations.txt line 5: .*wnids.txt"):
    run_config.dataset_info(_config(dataset="tiny_imagenet", data_dir=root))


def test_tiny_imagenet_missing_val_image(tmp_path):
  root = write_tiny_imagenet(str(tmp_path))
  os.remove(os.path.join(root, "val", "images", "val_2.JPEG"))
  with pytest.raises(FileNotFoundError, match=r"1 images listed in .* are missing, e.g. "
                                              r".*val_2.JPEG"):
    run_config.dataset_info(_config(dataset="tiny_imagenet", data_dir=root))


def test_tiny_imagenet_corrupt_or_wrong_size_jpeg(tmp_path):
  root = write_tiny_imagenet(str(tmp_path))
  config = _config(dataset="tiny_imagenet", data_dir=root)
  bad = os.path.join(root, "train", "n01", "images", "n01_0.JPEG")
  with open(bad, "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(ValueError, match="Cannot decode image .*n01_0.JPEG"):
    run_config.source(config, "train").read(np.array([3]))
  Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(bad, format="JPEG")
  with pytest.raises(ValueError, match=r"n01_0.JPEG has shape \(32, 64, 3\), expected "
                                       r"\(64, 64, 3\)"):
    run_config.source(config, "train").read(np.array([3]))


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.zeros(2, int)),
     r"missing arrays \['x_test', 'y_test'\]"),
    (dict(x_train=np.zeros((2, 8, 8), np.float32), y_train=np.zeros(2, int)),
     r"x_train: images must be uint8, found float32"),
    (dict(x_train=np.zeros((2, 8, 8, 2), np.uint8), y_train=np.zeros(2, int)),
     r"x_train: images must have shape \(N, H, W\) or \(N, H, W, C\) with C in \{1, 3\}, found "
     r"\(2, 8, 8, 2\)"),
    (dict(x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.zeros(3, int)),
     r"x_train has 2 images but y_train has 3 labels"),
    (dict(x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.array([0, -1])),
     r"y_train labels must be >= 0, found -1"),
    (dict(x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.zeros(2, np.float32)),
     r"y_train must be a 1-D integer array"),
])
def test_npz_bad_arrays(tmp_path, arrays, match):
  path = str(tmp_path / "bad.npz")
  defaults = dict(x_test=np.zeros((1, 8, 8), np.uint8), y_test=np.zeros(1, int))
  if "missing" in match:
    defaults = {}
  np.savez(path, **{**defaults, **arrays})
  with pytest.raises(ValueError, match=match):
    run_config.dataset_info(_config(dataset="npz", data_dir=path))


def test_npz_missing_or_not_a_zip(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"npz file .* not found: {tmp_path}/x.npz"):
    run_config.dataset_info(_config(dataset="npz", data_dir=str(tmp_path / "x.npz")))
  (tmp_path / "y.npz").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(ValueError, match=f"Cannot read npz file {tmp_path}/y.npz"):
    run_config.dataset_info(_config(dataset="npz", data_dir=str(tmp_path / "y.npz")))


def test_tfds_not_prepared(tmp_path):
  """A TFDS dataset missing from the data dir is an error that says what to run; it is never
  downloaded or prepared while reading (that needs TensorFlow: bitnet_jax/data/prepare.py)."""
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match=(
      rf"(?s)TFDS dataset 'cifar10' is not prepared in {tmp_path} \(no {tmp_path}/cifar10/.*"
      rf"dataset_info.json\).*python -m bitnet_jax.cli.prepare cifar10 --data_dir {tmp_path}\n.*"
      r"config.data_dir.*cifar-10-batches-py/data_batch_1")):
    run_config.dataset_info(_config(dataset="cifar10", data_dir=str(tmp_path)))
  assert os.listdir(tmp_path) == []  # nothing downloaded or written


def test_bad_pipeline_settings(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"Unknown config.augment 'flip'; expected one of "):
    run_config.train_iter(_config(augment="flip"))
  with pytest.raises(ValueError, match="batch_size=128 is larger than the 64 training examples"):
    run_config.train_iter(_config(batch_size=128))
  with pytest.raises(ValueError, match=r"max_train_examples must be -1 \(whole split\) or >= 1"):
    run_config.train_iter(_config(max_train_examples=0))
  _as_process(monkeypatch, 0, 3)
  with pytest.raises(ValueError, match="batch_size=8 .* divisible by the number of processes, 3"):
    run_config.train_iter(_config())
