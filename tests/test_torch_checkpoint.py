"""Tests of the torch-free reader (interop.torch_reader), writer (interop.torch_writer) and layout
mapping (interop.release) of the release's Lightning checkpoints."""

import argparse
import collections
import fractions
import os
import pickle
import zipfile

import numpy as np
import pytest

from bitnet_jax import interop
from bitnet_jax import reference
from bitnet_jax.interop import torch_writer

try:
  import torch
except ImportError:  # the reader itself never needs torch
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
FS = 0.125  # channels 8, 16, 32, 64


def release_state_dict(rng, fs=FS, num_classes=10, in_channels=3, prefix="model."):
  """Random release-layout weights that make every layer spike sometimes, not always.

  Spikes have a density of a few tens of percent; scaling by the fan-in keeps the
  pre-activations O(1), and biases in [-0.2, 0.6] spread `pred` over [0, 1].
  """
  shapes = interop.expected_torch_shapes(fs=fs, num_classes=num_classes, in_channels=in_channels)
  sd = {}
  for key, shape in shapes.items():
    if key.endswith("weight"):
      fan_in = int(np.prod(shape[1:]))
      sd[prefix + key] = rng.normal(0, 1.5 / np.sqrt(fan_in), shape).astype(np.float32)
    else:
      sd[prefix + key] = rng.uniform(-0.2, 0.6, shape).astype(np.float32)
  return sd


def write_zip(path, pkl: bytes, prefix="archive/", storages=None, byteorder=None):
  """A torch.save-like zip around an arbitrary pickle (for hostile/corrupt files)."""
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(prefix + "data.pkl", pkl)
    zf.writestr(prefix + "version", b"3\n")
    if byteorder:
      zf.writestr(prefix + "byteorder", byteorder)
    for key, data in (storages or {}).items():
      zf.writestr(f"{prefix}data/{key}", data)


def assert_same_state_dict(got, want):
  assert list(got) == list(want)
  for k in want:
    w = np.asarray(want[k])
    assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
    np.testing.assert_array_equal(got[k], w, err_msg=k)


# ----------------------------------------------------------------------------- reading


def test_hand_written_checkpoint_round_trip(tmp_path):
  sd = release_state_dict(np.random.default_rng(0))
  extra = {"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.5.0",
           "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {
               "best_model_score": np.array(0.91, np.float32), "best_model_path": "x.ckpt"}},
           "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": np.ones(3)}},
                                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]}],
           "hyper_parameters": {"fs": FS, "blob": b"\x00\xffab", "none": None}}
  path = tmp_path / "hand.ckpt"
  interop.write_checkpoint(path, sd, extra=extra)
  assert_same_state_dict(interop.read_state_dict(path), sd)
  full = interop.load_checkpoint(path)
  assert full["epoch"] == 3 and full["hyper_parameters"]["blob"] == b"\x00\xffab"
  assert full["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
  np.testing.assert_array_equal(full["optimizer_states"][0]["state"][0]["exp_avg"], np.ones(3))


def test_bare_state_dict_and_odd_dtypes(tmp_path):
  """A bare state dict (no 'state_dict' entry); 0-d, empty, bf16, int and bool tensors."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  arrays = {"a": np.array(2.5), "b": np.zeros((0, 3), np.int64),
            "c": np.arange(5).astype(ml_dtypes.bfloat16), "d": np.array([True, False]),
            "e": np.arange(6, dtype=np.float16).reshape(3, 2)}
  path = tmp_path / "bare.pt"
  pkl = torch_writer._PickleWriter()  # pylint: disable=protected-access
  data = pkl.dump(collections.OrderedDict(arrays))
  write_zip(path, data, storages={str(i): a.tobytes() for i, a in enumerate(pkl.storages)})
  assert_same_state_dict(interop.read_state_dict(path), arrays)


def test_big_endian_storages(tmp_path):
  arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
            "c": np.array([1 + 2j, -3.5j], np.complex64), "i": np.array([1, -2], np.int64)}
  w = torch_writer._PickleWriter()  # pylint: disable=protected-access
  pkl = w.dump({"state_dict": arrays})
  big = {str(i): a.astype(a.dtype.newbyteorder(">")).tobytes() for i, a in enumerate(w.storages)}
  path = tmp_path / "big.ckpt"
  write_zip(path, pkl, storages=big, byteorder=b"big")
  assert_same_state_dict(interop.read_state_dict(path), arrays)


@needs_torch
def test_torch_load_reads_hand_written_checkpoint(tmp_path):
  sd = release_state_dict(np.random.default_rng(1))
  path = tmp_path / "hand.ckpt"
  interop.write_checkpoint(path, sd, extra={"epoch": 2, "hyper_parameters": {"lr": 0.1}})
  for mmap in (False, True):
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert loaded["epoch"] == 2 and loaded["hyper_parameters"] == {"lr": 0.1}
    assert_same_state_dict({k: v.numpy() for k, v in loaded["state_dict"].items()}, sd)


def _lightning_like(sd_torch, extra_hparams=None):
  """What PyTorch Lightning 1.x saves, with the kinds of values its entries hold."""
  hp = argparse.Namespace(fs=FS, dataset="cifar10", lr=np.float64(1e-3), steps=50)
  return {
      "epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.5.0",
      "state_dict": sd_torch,
      "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
      "callbacks": {
          "ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
              "monitor": "val_acc", "best_model_score": torch.tensor(0.9437),
              "best_model_path": "/ckpt/epoch=3.ckpt",
              "best_k_models": {"/ckpt/epoch=3.ckpt": torch.tensor(0.9437)}},
          collections.Counter: {"note": "PL < 1.5 keyed callbacks by class"}},
      "optimizer_states": [{
          "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.ones(3)}},
          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]}],
      "lr_schedulers": [{"last_epoch": 3, "_last_lr": [1e-3]}],
      "native_amp_scaling_state": {"scale": 65536.0, "_growth_tracker": 0},
      "hparams_name": "hparams",
      "hyper_parameters": hp if extra_hparams is None else extra_hparams,
  }


@needs_torch
def test_real_torch_save_of_lightning_like_checkpoint(tmp_path):
  sd = release_state_dict(np.random.default_rng(2))
  sd_torch = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in sd.items())
  # A non-contiguous view (strides, storage offset) and a Parameter, as torch may store them.
  big = torch.zeros(sd["model.mlp1.layer.weight"].shape[1] + 1, 10)
  big[1:] = torch.from_numpy(sd["model.mlp1.layer.weight"].T.copy())
  sd_torch["model.mlp1.layer.weight"] = big[1:].t()
  sd_torch["model.begin.layer.bias"] = torch.nn.Parameter(sd_torch["model.begin.layer.bias"])
  path = tmp_path / "lightning.ckpt"
  torch.save(_lightning_like(sd_torch), path)

  assert_same_state_dict(interop.read_state_dict(path), sd)
  full = interop.load_checkpoint(path)
  assert full["hyper_parameters"] == {"fs": FS, "dataset": "cifar10", "lr": 1e-3, "steps": 50}
  hparams = full["hyper_parameters"]  # in the file: an argparse.Namespace holding an np.float64
  assert type(hparams) is interop.HParams and type(hparams["lr"]) is np.float64
  np.testing.assert_allclose(full["callbacks"][
      "ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}"]["best_model_score"], 0.9437)
  params = interop.to_flax_params(interop.read_state_dict(path), fs=FS, num_classes=10)
  assert params["mlp1"]["kernel"].shape == (16 * 64, 10)


@needs_torch
def test_unknown_class_called_outside_state_dict_needs_strict_false(tmp_path):
  sd = release_state_dict(np.random.default_rng(3))
  sd_torch = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
  path = tmp_path / "fraction.ckpt"
  torch.save(_lightning_like(sd_torch, {"ratio": fractions.Fraction(1, 3)}), path)
  with pytest.raises(interop.UnsafeCheckpointError, match="fractions.Fraction"):
    interop.read_state_dict(path)
  assert_same_state_dict(interop.read_state_dict(path, strict=False), sd)
  ratio = interop.load_checkpoint(path, strict=False)["hyper_parameters"]["ratio"]
  assert isinstance(ratio, interop.UnknownObject) and ratio.qualname == "fractions.Fraction"


@needs_torch
def test_real_lightning_checkpoint(tmp_path):
  """A checkpoint written by PyTorch Lightning's Trainer itself (Adam, OneCycleLR,
  ModelCheckpoint, Namespace hyper-parameters) loads in strict mode."""
  pl = pytest.importorskip("pytorch_lightning")
  nn = torch.nn
  c1, c2, c3, c4 = 8, 16, 32, 64  # fs = 0.125

  class Wrap(nn.Module):  # the release names its layers `<layer>.layer`
    def __init__(self, layer):
      super().__init__()
      self.layer = layer

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      for name, (i, o) in {"begin": (3, c1), "layer1": (c1, c1), "layer2": (c1, c2),
                           "layer3": (c2, c3), "layer4": (c3, c4)}.items():
        setattr(self, name, Wrap(nn.Conv2d(i, o, 3, 1, 1)))
      self.mlp1 = Wrap(nn.Linear(16 * c4, 10))

    def forward(self, x):
      pool = nn.functional.max_pool2d
      x = pool(self.layer1.layer(self.begin.layer(x)), 2)
      x = self.layer3.layer(pool(self.layer2.layer(x), 2))
      return self.mlp1.layer(pool(self.layer4.layer(x), 2).flatten(1))

  class Module(pl.LightningModule):
    def __init__(self, hparams):
      super().__init__()
      self.save_hyperparameters(hparams)
      self.model = Net()

    def training_step(self, batch, _):
      x, y = batch
      loss = ((self.model(x) - nn.functional.one_hot(y, 10).float()) ** 2).mean()
      self.log("train_loss", loss)
      return loss

    def configure_optimizers(self):
      opt = torch.optim.Adam(self.parameters(), 1e-3)
      sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.01, total_steps=4)
      return [opt], [{"scheduler": sched, "interval": "step"}]

  data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
  ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", save_last=True)
  trainer = pl.Trainer(max_steps=2, callbacks=[ckpt], logger=False, accelerator="cpu",
                       enable_progress_bar=False, enable_model_summary=False)
  trainer.fit(Module(argparse.Namespace(fs=FS, dataset="cifar10")),
              torch.utils.data.DataLoader(data, batch_size=2))
  want = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
  assert_same_state_dict(interop.read_state_dict(ckpt.last_model_path),
                         {k: v.numpy() for k, v in want.items()})
  full = interop.load_checkpoint(ckpt.last_model_path)
  assert full["hyper_parameters"]["dataset"] == "cifar10"
  interop.to_flax_params(interop.read_state_dict(ckpt.last_model_path), fs=FS, num_classes=10)


# ----------------------------------------------------------------------------- hostile files


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("where", ["top", "callbacks", "state_dict"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, where):
  target = tmp_path / "pwned"
  evil = _Evil(target)
  obj = {"state_dict": {}, "epoch": 1}
  if where == "top":
    obj = evil
  elif where == "callbacks":
    obj["callbacks"] = {"x": evil}
  else:
    obj["state_dict"] = {"model.begin.layer.weight": evil}
  path = tmp_path / "evil.ckpt"
  write_zip(path, pickle.dumps(obj, protocol=2))
  with pytest.raises(interop.UnsafeCheckpointError, match=r"system"):
    interop.read_state_dict(path)
  with pytest.raises(interop.UnsafeCheckpointError, match=r"system"):
    interop.load_checkpoint(path)
  if where == "callbacks":  # strict=False keeps it as inert data
    rec = interop.load_checkpoint(path, strict=False)["callbacks"]["x"]
    assert isinstance(rec, interop.UnknownObject) and rec.qualname.endswith(".system")
    assert rec.args == (f"touch {target}",)
  if where == "state_dict":  # ... but never inside the state dict
    with pytest.raises(interop.UnsafeCheckpointError, match="not tensors"):
      interop.read_state_dict(path, strict=False)
  assert not target.exists()


@pytest.mark.parametrize("pkl,match", [
    (b"\x80\x02c__builtin__\neval\nX\x05\x00\x00\x001 + 1\x85R.", "builtins.eval"),
    # BUILD on an allowed stand-in must not modify it.
    (b"\x80\x02ccollections\nOrderedDict\n}b.", "modify"),
    (b"\x80\x02X\x01\x00\x00\x00xQ.", "persistent id"),
])
def test_other_hostile_pickles(tmp_path, pkl, match):
  path = tmp_path / "h.ckpt"
  write_zip(path, pkl)
  with pytest.raises(interop.UnsafeCheckpointError, match=match):
    interop.load_checkpoint(path)


def test_build_cannot_change_a_validated_tensor(tmp_path):
  """A BUILD after a tensor's rebuild could otherwise move it outside its storage."""
  w = torch_writer._PickleWriter()  # pylint: disable=protected-access
  pkl = w.dump(np.zeros(4, np.float32))
  assert pkl.endswith(b".")
  evil = pkl[:-1] + b"}X\x06\x00\x00\x00offsetJ\x00\x00\x00\x10sb."  # {'offset': 2**28}
  path = tmp_path / "b.ckpt"
  write_zip(path, evil, storages={"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(interop.UnsafeCheckpointError, match="modify a tensor"):
    interop.load_checkpoint(path)


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    interop.read_state_dict(tmp_path / "nope.ckpt")


def test_not_a_zip_and_truncated_zip(tmp_path):
  path = tmp_path / "junk.ckpt"
  path.write_bytes(b"this is not a zip file" * 10)
  with pytest.raises(interop.CheckpointFormatError, match="not a torch.save zip"):
    interop.read_state_dict(path)
  good = tmp_path / "good.ckpt"
  interop.write_checkpoint(good, release_state_dict(np.random.default_rng(4)))
  data = good.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(interop.CheckpointFormatError):
    interop.read_state_dict(path)
  # Flip bytes inside a storage: the zip CRC check catches it.
  with zipfile.ZipFile(good) as zf:
    info = zf.getinfo("archive/data/0")
  start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  corrupt = bytearray(data)
  corrupt[start:start + 8] = bytes(255 - b for b in corrupt[start:start + 8])
  path.write_bytes(bytes(corrupt))
  with pytest.raises(interop.CheckpointFormatError, match="data/0"):
    interop.read_state_dict(path)


def test_zip_without_data_pkl_and_without_state_dict(tmp_path):
  path = tmp_path / "other.zip"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("readme.txt", "hello")
  with pytest.raises(interop.CheckpointFormatError, match="data.pkl"):
    interop.read_state_dict(path)
  write_zip(path, pickle.dumps({"epoch": 1, "weights": [1, 2]}, protocol=2))
  with pytest.raises(interop.CheckpointFormatError, match=r"no 'state_dict'.*epoch"):
    interop.read_state_dict(path)


def test_storage_reference_errors(tmp_path):
  w = torch_writer._PickleWriter()  # pylint: disable=protected-access
  pkl = w.dump({"state_dict": {"a": np.zeros(4, np.float32)}})
  path = tmp_path / "s.ckpt"
  write_zip(path, pkl)  # no data/0
  with pytest.raises(interop.CheckpointFormatError, match="data/0"):
    interop.read_state_dict(path)
  write_zip(path, pkl, storages={"0": b"\0" * 12})  # 3 floats instead of 4
  with pytest.raises(interop.CheckpointFormatError, match="16 bytes, found 12"):
    interop.read_state_dict(path)


# ----------------------------------------------------------------------------- layouts


def _flax_params(rng, fs=FS, num_classes=10, in_channels=3):
  c1, c2, c3, c4 = int(64 * fs), int(128 * fs), int(256 * fs), int(512 * fs)
  shapes = {"begin": (3, 3, in_channels, c1), "layer1": (3, 3, c1, c1),
            "layer2": (3, 3, c1, c2), "layer3": (3, 3, c2, c3), "layer4": (3, 3, c3, c4),
            "mlp1": (16 * c4, num_classes)}
  return {k: {"kernel": rng.normal(size=s).astype(np.float32),
              "bias": rng.normal(size=s[-1]).astype(np.float32)} for k, s in shapes.items()}


def test_flax_torch_flax_round_trip_is_exact(tmp_path):
  params = _flax_params(np.random.default_rng(5))
  sd = interop.to_torch_state_dict(params)
  assert sd["model.begin.layer.weight"].shape == (8, 3, 3, 3)
  assert sd["model.mlp1.layer.weight"].shape == (10, 64 * 16)
  back = interop.to_flax_params(sd, fs=FS, num_classes=10)
  path = tmp_path / "rt.ckpt"
  interop.write_checkpoint(path, sd)
  back_file = interop.to_flax_params(interop.read_state_dict(path), fs=FS, num_classes=10)
  for p in (back, back_file, interop.to_flax_params(interop.to_torch_state_dict({"params": back}),
                                               fs=FS, num_classes=10)):
    for layer in params:
      for k in ("kernel", "bias"):
        np.testing.assert_array_equal(p[layer][k], params[layer][k])
  # Keys without the `model.` prefix are accepted too.
  unprefixed = {k[len("model."):]: v for k, v in sd.items()}
  np.testing.assert_array_equal(
      interop.to_flax_params(unprefixed, fs=FS, num_classes=10)["mlp1"]["kernel"],
      params["mlp1"]["kernel"])


def test_layout_permutations_by_index_encoding():
  """Entries encode their own index, so the (C,H,W) -> (H,W,C) permutation is checked exactly."""
  sd = {k: np.zeros(s, np.float32)
        for k, s in interop.expected_torch_shapes(fs=FS, num_classes=10).items()}
  c4, classes = 64, 10
  o, c, h, w = np.meshgrid(np.arange(classes), np.arange(c4), np.arange(4), np.arange(4),
                           indexing="ij")
  code = (o * 100000 + c * 100 + h * 10 + w).astype(np.float32)  # (out, C, H, W), exact f32
  sd["mlp1.layer.weight"] = code.reshape(classes, c4 * 16)  # torch flattens (C, H, W)
  conv = np.arange(8 * 8 * 9, dtype=np.float32).reshape(8, 8, 3, 3)  # (O, I, kh, kw)
  sd["layer1.layer.weight"] = conv
  p = interop.to_flax_params(sd, fs=FS, num_classes=10)
  kernel = p["mlp1"]["kernel"]  # (H*W*C, out): row (h * 4 + w) * C + c (docs/INTERFACES.md)
  for oo, cc, hh, ww in [(0, 0, 0, 1), (3, 5, 2, 1), (9, 63, 3, 3), (1, 17, 0, 2)]:
    assert kernel[(hh * 4 + ww) * c4 + cc, oo] == oo * 100000 + cc * 100 + hh * 10 + ww
  for oo, ii, kh, kw in [(0, 1, 2, 0), (7, 3, 1, 2)]:
    assert p["layer1"]["kernel"][kh, kw, ii, oo] == conv[oo, ii, kh, kw]


def test_architecture_mismatch_errors():
  sd = release_state_dict(np.random.default_rng(6))
  with pytest.raises(ValueError) as e:
    interop.to_flax_params(sd, fs=0.25, num_classes=10)
  msg = str(e.value)
  assert "model.begin.layer.weight: expected (16, 3, 3, 3), found (8, 3, 3, 3)" in msg
  assert "model.mlp1.layer.weight: expected (10, 2048), found (10, 1024)" in msg
  assert "fs=0.125" in msg  # the hint names what the checkpoint looks like
  with pytest.raises(ValueError, match=r"mlp1.layer.bias: expected \(100,\), found \(10,\)"):
    interop.to_flax_params(sd, fs=FS, num_classes=100)
  missing = {k: v for k, v in sd.items() if k != "model.layer3.layer.bias"}
  with pytest.raises(ValueError, match=r"missing keys \['model.layer3.layer.bias'\]"):
    interop.to_flax_params(missing, fs=FS, num_classes=10)
  with pytest.raises(ValueError, match=r"unexpected keys \['model.extra.weight'\]"):
    interop.to_flax_params({**sd, "model.extra.weight": np.zeros(1)}, fs=FS, num_classes=10)
  with pytest.raises(ValueError, match="variant"):
    interop.to_flax_params(sd, variant="BITnet7", fs=FS, num_classes=10)
  with pytest.raises(ValueError, match="img_size"):
    interop.to_flax_params(sd, fs=FS, num_classes=10, img_size=48)


# ----------------------------------------------------------------------------- the model


def _bitnet_api_ready():
  try:
    import bitnet_jax  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return hasattr(bitnet_jax, "create_model") and hasattr(bitnet_jax, "spike_counts")


needs_api = pytest.mark.skipif(not _bitnet_api_ready(),
                               reason="bitnet_jax.create_model/spike_counts not available")

@needs_api
@pytest.mark.parametrize("variant,img,classes,steps", [("BITnet6", 32, 10, 6),
                                                       ("BITnet6_v101", 64, 20, 4)])
def test_loaded_model_matches_reference_float64(tmp_path, variant, img, classes, steps):
  """Spike counts of the loaded JAX model == the NumPy reference, exactly, in float64."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import bitnet_jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  path = tmp_path / "m.ckpt"
  interop.write_checkpoint(path, release_state_dict(rng, num_classes=classes))
  images = rng.normal(size=(3, 3, img, img))  # (B, C, H, W)
  with jax.enable_x64(True):  # jax_enable_x64 is process-global: scope it
    model = interop.load_torch_checkpoint(path, variant=variant, fs=FS, num_classes=classes,
                                     img_size=img, dtype=jnp.float64)
    counts = np.asarray(bitnet_jax.spike_counts(model, images.transpose(0, 2, 3, 1), steps))
  ref = reference.run(interop.to_reference_weights(model.params), images, steps, variant=variant)
  assert np.all(ref["layer_spikes"] > 0), ref["layer_spikes"]  # every layer fires ...
  assert 0 < ref["counts"].mean() < steps and len(np.unique(ref["counts"])) > 1  # ... not always
  np.testing.assert_array_equal(counts, ref["counts"])


@needs_api
def test_load_torch_checkpoint_float32(tmp_path):
  """The default (float32) model has exactly the saved weights; counts agree with the
  float64 reference up to rare float32 rounding flips at integer boundaries."""
  import bitnet_jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(8)
  sd = release_state_dict(rng)
  path = tmp_path / "m.ckpt"
  interop.write_checkpoint(path, sd, extra={"epoch": 1})
  model = bitnet_jax.load_torch_checkpoint(path, fs=FS, num_classes=10)
  assert_same_state_dict(interop.to_torch_state_dict(model), sd)
  images = rng.normal(size=(4, 3, 32, 32))
  counts = np.asarray(bitnet_jax.spike_counts(model, images.transpose(0, 2, 3, 1)
                                              .astype(np.float32), 5))
  ref = reference.run(interop.to_reference_weights(model.params), images.astype(np.float32), 5)
  assert np.abs(counts - ref["counts"]).sum() <= 2  # stated tolerance: at most 2 flips
  with pytest.raises(ValueError, match="expected"):
    bitnet_jax.load_torch_checkpoint(path, fs=0.25, num_classes=10)
