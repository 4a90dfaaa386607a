"""Tests of the NumPy reference of the release's per-step loop (bitnet_jax/reference.py)."""

import numpy as np
import pytest

from bitnet_jax import reference


def _channels(fs):
  return [int(64 * fs), int(128 * fs), int(256 * fs), int(512 * fs)]


def random_weights(rng, fs=0.125, num_classes=10, in_channels=3, scale=1.0):
  """Release-layout weights whose pre-activations spread over roughly [-0.5, 1.5]."""
  c1, c2, c3, c4 = _channels(fs)
  shapes = {"begin": (c1, in_channels), "layer1": (c1, c1), "layer2": (c2, c1),
            "layer3": (c3, c2), "layer4": (c4, c3)}
  w = {}
  for name, (o, i) in shapes.items():
      # Spikes have a density of a few tens of percent; this fan-in scaling keeps
      # pre-activations O(1) so that neurons neither never nor always fire.
    w[name] = (rng.normal(0, scale * 1.5 / np.sqrt(9 * i), (o, i, 3, 3)),
               rng.uniform(-0.2, 0.6, (o,)))
  w["mlp1"] = (rng.normal(0, scale * 1.5 / np.sqrt(c4 * 16), (num_classes, c4 * 16)),
               rng.uniform(-0.2, 0.6, (num_classes,)))
  return w


def conv_direct(x, w, b):
  """Conv2d 3x3 stride 1 padding 1 by explicit loops (B, C, H, W) -> (B, O, H, W)."""
  bsz, cin, h, wd = x.shape
  out = np.zeros((bsz, w.shape[0], h, wd))
  for n in range(bsz):
    for o in range(w.shape[0]):
      for y in range(h):
        for xx in range(wd):
          acc = b[o]
          for c in range(cin):
            for i in range(3):
              for j in range(3):
                yy, xj = y + i - 1, xx + j - 1
                if 0 <= yy < h and 0 <= xj < wd:
                  acc += x[n, c, yy, xj] * w[o, c, i, j]
          out[n, o, y, xx] = acc
  return out


# ----------------------------------------------------------------------------- the neuron


def test_if_step_constant_04_spikes_at_floor_of_04t():
  """pred = 0.4 every step: spikes at steps 3, 5, 8, 10, i.e. floor(0.4 t) spikes by t."""
  state = np.zeros(())
  spikes = []
  for _ in range(10):
    s, state = reference.if_step(state, np.array(0.4))
    spikes.append(int(s))
  steps_with_spike = [t + 1 for t, s in enumerate(spikes) if s]
  assert steps_with_spike == [3, 5, 8, 10]
  np.testing.assert_array_equal(np.cumsum(spikes), np.floor(0.4 * np.arange(1, 11)))
  assert 0 <= state < 1


def test_if_step_exactly_one_spikes_and_resets_to_zero():
  s, state = reference.if_step(np.array(0.5), np.array(0.5))  # c == 1.0 exactly
  assert s == 1 and state == 0
  s, state = reference.if_step(np.array(0.0), np.array(1.0))  # pred clamped to 1
  assert s == 1 and state == 0
  s, state = reference.if_step(np.array(0.0), np.array(np.nextafter(1.0, 0)))
  assert s == 0 and state == np.nextafter(1.0, 0)


# ----------------------------------------------------------------------------- helpers


def test_conv_matches_direct_loops():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 6))
  w = rng.normal(size=(4, 3, 3, 3))
  b = rng.normal(size=(4,))
  np.testing.assert_allclose(reference.conv3x3_nchw(x, w, b), conv_direct(x, w, b),
                             rtol=1e-12, atol=1e-12)


def test_conv_shape_errors_are_clear():
  with pytest.raises(ValueError, match=r"\(O, 3, 3, 3\).*\(4, 2, 3, 3\)"):
    reference.conv3x3_nchw(np.zeros((1, 3, 4, 4)), np.zeros((4, 2, 3, 3)), np.zeros(4))


def test_maxpool_is_or_of_2x2_blocks():
  x = np.zeros((1, 1, 4, 4))
  x[0, 0, 1, 1] = 1
  x[0, 0, 2, 3] = 1
  np.testing.assert_array_equal(reference.maxpool2x2_nchw(x)[0, 0], [[1, 0], [0, 1]])


def test_predict_takes_first_maximum_on_ties():
  np.testing.assert_array_equal(reference.predict(np.array([[1, 3, 3, 0], [2, 2, 2, 2]])),
                                [1, 0])


# ----------------------------------------------------------------------------- the network


def _hand_weights(in_channels=3):
  """Two channels per layer; each layer passes the centre tap of its own channel on.

  Every layer l has W[o, i] = a_l * delta(o, i) at the kernel centre (no mixing, no spatial
  spread) so every neuron of a layer sees the same input and all steps can be worked out by
  hand. mlp1 rows: 0 -> mean of its 32 inputs, 1 -> bias 0.25, 2 -> bias 2 (clamped to 1),
  3 -> bias -1 (clamped to 0).
  """
  def centre(a):
    w = np.zeros((2, 2, 3, 3))
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = a
    return w, np.zeros(2)

  mlp_w = np.zeros((4, 2 * 4 * 4))
  mlp_w[0] = 1 / 32
  return {
      "begin": (np.zeros((2, in_channels, 3, 3)), np.full(2, 0.4)),  # pred 0.4 -> 3,5,8,10
      "layer1": centre(0.5),  # pred 0.5 at 3,5,8,10 -> spikes at 5, 10
      "layer2": centre(1.0),  # pred 1 at 5, 10 -> spikes at 5, 10
      "layer3": centre(0.6),  # pred 0.6 at 5, 10 -> spike at 10
      "layer4": centre(3.0),  # pred 3 -> clamped to 1 at 10 -> spike at 10
      "mlp1": (mlp_w, np.array([0.0, 0.25, 2.0, -1.0])),
  }


@pytest.mark.parametrize("variant,img", [("BITnet6", 32), ("BITnet6_v101", 32),
                                          ("BITnet6", 64)])
def test_hand_computed_network(variant, img):
  images = np.random.default_rng(1).normal(size=(2, 3, img, img))  # ignored: begin W = 0
  out = reference.run(_hand_weights(), images, steps=10, variant=variant)
  # mlp1: row 0 gets 1 at step 10 only; row 1 floor(2.5); row 2 every step; row 3 never.
  np.testing.assert_array_equal(out["counts"], [[1, 2, 10, 0]] * 2)
  np.testing.assert_array_equal(out["final_state"], [[0, 0.5, 0, 0]] * 2)
  s = img // 32  # spatial side of begin's output in units of 32
  # Spatial sides: begin/layer1 see 32s; pools per variant follow.
  side = {"begin": 32 * s, "layer1": 32}
  if variant == "BITnet6":
    side.update(layer2=16, layer3=8, layer4=8)
  else:
    side.update(layer2=16, layer3=16, layer4=8)
  expected = [4 * 2 * side["begin"] ** 2, 2 * 2 * side["layer1"] ** 2,
              2 * 2 * side["layer2"] ** 2, 1 * 2 * side["layer3"] ** 2,
              1 * 2 * side["layer4"] ** 2, 1 + 2 + 10 + 0]
  np.testing.assert_array_equal(out["layer_spikes"], [expected] * 2)
  np.testing.assert_array_equal(reference.predict(out["counts"]), [2, 2])


def test_zero_steps():
  out = reference.run(_hand_weights(), np.zeros((1, 3, 32, 32)), steps=0)
  np.testing.assert_array_equal(out["counts"], np.zeros((1, 4)))
  np.testing.assert_array_equal(out["layer_spikes"], np.zeros((1, 6)))


def test_floor_of_running_sum_identity_float64():
  """Spikes up to step t == floor(pred_1 + ... + pred_t), for every layer (ORIGINAL.md)."""
  rng = np.random.default_rng(2)
  w = random_weights(rng)
  x = rng.normal(size=(2, 3, 32, 32))
  steps = 8
  out = reference.run(w, x, steps=steps, return_spike_trains=True)
  trains = out["spike_trains"]

  # First layer: constant input, pred from an independent direct-loop conv on one image.
  pred0 = np.clip(conv_direct(x[:1], *w["begin"]), 0, 1)  # (1, c1, 32, 32)
  cum_pred = np.cumsum(np.repeat(pred0[None], steps, axis=0), axis=0)  # (T, 1, c1, H, W)
  np.testing.assert_array_equal(np.cumsum(trains[0][:, :1], axis=0), np.floor(cum_pred))
  assert 0 < trains[0].mean() < 1

  # Later layers: pred_t recomputed from the previous layer's recorded (pooled) spikes.
  pools = reference.pool_after("BITnet6", 32)
  for li in range(1, 6):
    prev_name, name = reference.LAYERS[li - 1], reference.LAYERS[li]
    inp = trains[li - 1]  # (T, B, ...)
    if pools[prev_name]:
      inp = np.stack([reference.maxpool2x2_nchw(s) for s in inp])
    if name == "mlp1":
      pre = inp.reshape(steps, 2, -1) @ w["mlp1"][0].T + w["mlp1"][1]
    else:
      pre = np.stack([reference.conv3x3_nchw(s, *w[name]) for s in inp])
    cum_pred = np.cumsum(np.clip(pre, 0, 1), axis=0)
    np.testing.assert_array_equal(np.cumsum(trains[li], axis=0), np.floor(cum_pred),
                                  err_msg=name)
    assert 0 < trains[li].mean() < 1, name
    np.testing.assert_array_equal(trains[li].reshape(steps, 2, -1).sum(axis=(0, 2)),
                                  out["layer_spikes"][:, li])
  np.testing.assert_array_equal(trains[5].sum(axis=0), out["counts"])


@pytest.mark.parametrize("variant", reference.VARIANTS)
@pytest.mark.parametrize("img,classes", [(32, 10), (64, 200)])
def test_shapes_and_dtypes(variant, img, classes):
  rng = np.random.default_rng(3)
  w = random_weights(rng, num_classes=classes)
  out = reference.run(w, rng.normal(size=(2, 3, img, img)), steps=3, variant=variant,
                      dtype=np.float32)
  assert out["counts"].shape == (2, classes) and out["counts"].dtype == np.int64
  assert out["layer_spikes"].shape == (2, 6)
  assert out["final_state"].shape == (2, classes) and out["final_state"].dtype == np.float32
  assert np.all((out["final_state"] >= 0) & (out["final_state"] < 1))
  assert np.all(out["counts"] <= 3)


def test_bad_inputs_raise_clear_errors():
  w = _hand_weights()
  with pytest.raises(ValueError, match="variant"):
    reference.run(w, np.zeros((1, 3, 32, 32)), 2, variant="BITnet7")
  with pytest.raises(ValueError, match="img_size"):
    reference.run(w, np.zeros((1, 3, 48, 48)), 2)
  bad = dict(w, layer2=(np.zeros((2, 5, 3, 3)), np.zeros(2)))
  with pytest.raises(ValueError, match=r"layer2.*\(O, 2, 3, 3\).*\(2, 5, 3, 3\)"):
    reference.run(bad, np.zeros((1, 3, 32, 32)), 2)
  bad = dict(w, mlp1=(np.zeros((4, 31)), np.zeros(4)))
  with pytest.raises(ValueError, match="31"):
    reference.run(bad, np.zeros((1, 3, 32, 32)), 2)
  with pytest.raises(ValueError, match="missing"):
    reference.run({k: v for k, v in w.items() if k != "mlp1"}, np.zeros((1, 3, 32, 32)), 2)
