"""benchmarks/profile_ops.py at a tiny size: it times the real train step, traces it, and its
table names the sparse synapses' forward and backward kernels."""

import re

import pytest

from benchmarks import profile_ops
from bitnet_jax.kernels import spike_conv

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"


_OK, _WHY = spike_conv.available()


@pytest.mark.skipif(not _OK, reason=f"spike_conv kernel unavailable: {_WHY}")
def test_profile_ops_lists_the_sparse_kernels(tmp_path, capsys):
  weights = str(tmp_path / "weights.npz")
  argv = ["--mode", "train", "--steps", "2", "--fs", "0.125", "--batch", "4", "--iters", "1",
          "--top", "40", "--weights", weights]
  profile_ops.main(argv)
  first = capsys.readouterr().out
  assert re.search(r"train, T=2, sparse synapses, remat=stream, chunk=0: median \d+ ms", first)
  for target in ("bitnet_spike_conv_f32", "bitnet_spike_sparse_conv_f32",
                 "bitnet_spike_kernel_grad_f32"):
    assert target in first, first
  assert (tmp_path / "weights.npz").exists()  # calibrated once, then read back
  profile_ops.main(argv[:1] + ["eval"] + argv[2:])
  assert "bitnet_spike_layer_f32" in capsys.readouterr().out
