"""Sparse synapses under data parallelism: with the batch sharded over 4 CPU devices, each
device's `spike_conv` kernel call sees only its share of the batch (of every time step), and the
spike counts and gradients are those of one device.

The device count of this test process is fixed when JAX starts, so the 4-device run is a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bitnet_jax.kernels import spike_conv


_OK, _WHY = spike_conv.available()
pytestmark = [pytest.mark.slow,  # the fast subset: python -m pytest -m "not slow"
              pytest.mark.skipif(not _OK, reason=f"spike_conv kernel unavailable: {_WHY}")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Batch 20 over 4 devices = 5 images per device; no other dimension of the model (T=3,
# 32/16/8/4/2 pixels, 3/16/32/64/128 channels, 10 classes) is 5 or 20, so the custom calls'
# shapes show which batch each call gets.
_SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import bitnet_jax
from bitnet_jax import data, engines, run_config
from bitnet_jax.kernels import spike_conv
from configs import default

assert jax.device_count() == 4, jax.devices()
B, T = 20, 3
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded, one = NamedSharding(mesh, P("data")), jax.devices()[0]
model = bitnet_jax.create_model(fs=0.25, num_classes=10, seed=0, sparse=True)
params = jax.tree_util.tree_map(lambda a: a * 2.0, model.params)  # every layer fires
images = np.random.default_rng(0).normal(size=(B, 32, 32, 3)).astype(np.float32)

def calls(compiled):
  # (op, [every dimension of every shape on the line]) per kernel call in the compiled HLO
  out = []
  for line in compiled.as_text().splitlines():
    m = re.search(r'custom_call_target="bitnet_spike_(\w+)_f32"', line)
    if m:
      dims = [int(d) for s in re.findall(r"f32\[([\d,]*)\]", line) for d in s.split(",") if d]
      out.append((m.group(1), dims))
  return out

result = {}
for engine in ("parallel", "scan"):
  f = jax.jit(lambda p, x, e=engine: engines.run(model.module, p, x, T, engine=e))
  full = f(jax.device_put(params, one), jax.device_put(images, one))
  split = f(params, jax.device_put(images, sharded))
  compiled = f.lower(params, jax.device_put(images, sharded)).compile()
  equal = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(full),
                                                    jax.tree_util.tree_leaves(split)))
  result[engine] = {"equal": equal, "fired": float(full.layer_spikes.sum()),
                    "sharded_out": str(split.layer_spikes.sharding.spec), "calls": calls(compiled),
                    "one_device_calls": calls(f.lower(jax.device_put(params, one),
                                                      jax.device_put(images, one)).compile())}

spikes = (np.random.default_rng(1).random((B, 8, 8, 16)) < 0.2).astype(np.float32)
kernel = np.random.default_rng(2).normal(size=(3, 3, 16, 24)).astype(np.float32)
conv = jax.jit(spike_conv.conv)
result["conv"] = {
    "equal": bool(np.array_equal(conv(spikes, kernel), conv(jax.device_put(spikes, sharded),
                                                           kernel))),
    "calls": calls(conv.lower(jax.device_put(spikes, sharded), kernel).compile())}

g = np.random.default_rng(3).normal(size=(B, 8, 8, 24)).astype(np.float32)
kernel_grad, input_grad = jax.jit(spike_conv.kernel_grad), jax.jit(spike_conv.input_grad)
split_args = jax.device_put(spikes, sharded), jax.device_put(g, sharded)
result["grads"] = {
    "kernel_grad": [kernel_grad(spikes, g).tolist(), kernel_grad(*split_args).tolist()],
    "input_grad_equal": bool(np.array_equal(input_grad(g, kernel),
                                            input_grad(split_args[1], kernel))),
    "calls": (calls(kernel_grad.lower(*split_args).compile()) +
              calls(input_grad.lower(split_args[1], kernel).compile()))}

config = default.get_config()
config.update(fs=0.25, time_steps=T, batch_size=B, synapses="sparse", remat="none")  # fused
info = data.DatasetInfo(name="x", num_classes=10, image_shape=(32, 32, 3), num_train=100,
                            num_test=10, mean=(0.5,) * 3, std=(0.25,) * 3)
step, init = run_config.standalone_train_step(config, info)
state = jax.eval_shape(init, jax.random.PRNGKey(0))
batch = {"image": jax.ShapeDtypeStruct((B, 32, 32, 3), np.uint8, sharding=sharded),
         "label": jax.ShapeDtypeStruct((B,), np.int32, sharding=sharded)}
result["train_step"] = {"calls": calls(step.lower(state, batch).compile())}
config.remat = "stream"  # the lean layers: conv over the steps, then the neuron's own kernel
step, init = run_config.standalone_train_step(config, info)
result["train_step_stream"] = {"calls": calls(step.lower(state, batch).compile())}

preds = np.random.default_rng(4).normal(0.4, 0.6, size=(T, B, 8, 8, 24)).astype(np.float32)
membranes = np.random.default_rng(5).random((B, 8, 8, 24)).astype(np.float32)
steps_split = NamedSharding(mesh, P(None, "data"))
neuron_steps = jax.jit(spike_conv.neuron_steps)
split_args = jax.device_put(preds, steps_split), jax.device_put(membranes, sharded)
result["neuron_steps"] = {
    "equal": all(np.array_equal(a, b) for a, b in zip(neuron_steps(preds, membranes),
                                                      neuron_steps(*split_args))),
    "calls": calls(neuron_steps.lower(*split_args).compile())}
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def four_devices():
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                             XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  return json.loads(out.stdout.split("RESULT")[-1])


def _assert_per_device_batch(calls, ops):
  """Each call's shapes hold the device's 5 images (15 = 3 steps x 5 where a convolution runs
  over the steps of a (T, N, ...) input), never the batch's 20 (60)."""
  assert {op for op, _ in calls} == set(ops), calls
  for op, dims in calls:
    assert (5 in dims or 15 in dims) and not {20, 60} & set(dims), \
        f"{op} call sees the whole batch: {dims}"


@pytest.mark.parametrize("engine", ["parallel", "scan"])
def test_sharded_model_counts_equal_one_device(four_devices, engine):
  r = four_devices[engine]
  assert r["fired"] > 0 and r["equal"]
  assert r["sharded_out"] == "P('data',)"  # (B, 6) spikes per layer: split by image
  _assert_per_device_batch(r["calls"], ["neuron", "layer"])
  assert all(20 in dims for _, dims in r["one_device_calls"])  # the check can tell them apart


def test_sharded_conv_equals_one_device(four_devices):
  r = four_devices["conv"]
  assert r["equal"]
  _assert_per_device_batch(r["calls"], ["conv"])


def test_sharded_gradient_kernels_equal_one_device(four_devices):
  """`kernel_grad` sums each device's images, then adds the devices' sums (another order than
  one device's: equal up to float32 rounding); `input_grad` is per image (bitwise equal)."""
  r = four_devices["grads"]
  one, split = (np.asarray(a) for a in r["kernel_grad"])
  assert np.abs(one).max() > 0
  np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
  assert r["input_grad_equal"]
  _assert_per_device_batch(r["calls"], ["kernel_grad", "sparse_conv"])


def test_train_step_kernels_see_the_device_batch(four_devices):
  """The real train step (`synapses=sparse`, global batch 20 on 4 devices): every kernel call,
  forward and backward (the recomputed synapse, its input and kernel gradients), is on the
  device's images."""
  _assert_per_device_batch(four_devices["train_step"]["calls"],
                           ["neuron", "layer", "conv", "sparse_conv", "kernel_grad"])


def test_stream_train_step_kernels_see_the_device_batch(four_devices):
  """remat="stream" (the CPU default): the synapse over all steps, the neuron over its preds
  (`neuron_steps`) and the gradient kernels, each on the device's images."""
  _assert_per_device_batch(four_devices["train_step_stream"]["calls"],
                           ["neuron", "neuron_steps", "conv", "sparse_conv", "kernel_grad"])


def test_sharded_neuron_steps_equals_one_device(four_devices):
  r = four_devices["neuron_steps"]
  assert r["equal"]
  _assert_per_device_batch(r["calls"], ["neuron_steps"])


def test_vmap_calls_the_kernel_per_element():
  """custom_partitioning has no batching rule of its own; vmap still works (one kernel call per
  vmapped element, as the plain ffi_call's vmap_method="sequential" did)."""
  rng = np.random.default_rng(0)
  x = (rng.random((2, 3, 8, 8, 4)) < 0.3).astype(np.float32)  # (V, N, H, W, Ci)
  kernels = rng.normal(size=(2, 3, 3, 4, 5)).astype(np.float32)  # (V, 3, 3, Ci, Co)
  got = jax.jit(jax.vmap(spike_conv.conv))(x, kernels)
  want = np.stack([spike_conv.conv(xi, ki) for xi, ki in zip(x, kernels)])
  np.testing.assert_array_equal(got, want)
  state, bias = np.zeros((3, 8, 8, 5), np.float32), np.zeros(5, np.float32)
  steps = (rng.random((2, 4, 3, 8, 8, 4)) < 0.3).astype(np.float32)  # (V, T, N, H, W, Ci)
  got = jax.vmap(lambda s: spike_conv.layer(s, kernels[0], bias, state, True, "ste"))(steps)
  for i, s in enumerate(steps):
    for g, w in zip(got, spike_conv.layer(s, kernels[0], bias, state, True, "ste")):
      np.testing.assert_array_equal(g[i], w)
