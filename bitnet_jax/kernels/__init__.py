"""Sparse synapses for XLA:CPU: C++ kernels that skip the zero spikes.

- `spike_conv.py`: the ops (conv, input_grad, kernel_grad, layer, neuron) and their gradients;
- `partition.py`: each op, under a batch-sharded jit, runs on its own device's images;
- `shared_library.py`: builds csrc/spike_conv.cc on first use, caches and registers it;
- `csrc/spike_conv.cc`: the kernels.
"""
