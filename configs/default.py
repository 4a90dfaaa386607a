"""Base configuration: every field, its unit and meaning. Variants import it and change fields.

Not meant to be run as it is (it trains the seed's CIFAR-10 model): pick a variant in configs/.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data (bitnet_jax/data/: registry.py, pipeline.py; read in run_config.py).
  c.dataset = "cifar10"           # cifar10 | cifar100 | fashion_mnist | mnist | tiny_imagenet | npz | synthetic
  c.data_dir = ""                 # local files (see README), TFDS data dir, or the .npz path; "" = TFDS default
  c.augment = "none"              # none (the release's loaders) | crop_flip (pad-4 crop + h-flip)
  c.max_train_examples = -1       # use only the first N training examples; -1 = whole split
  c.max_eval_examples = -1        # use only the first N test examples; -1 = whole split
  c.num_workers = 0               # grain worker processes; 0 = read in the training process
  c.synthetic_num_train = 1024    # synthetic only: training examples
  c.synthetic_num_test = 256      # synthetic only: test examples
  c.synthetic_num_classes = 10    # synthetic only: classes
  c.synthetic_image_shape = (32, 32, 3)  # synthetic only: (H, W, C)

  # Model (bitnet_jax/models.py).
  c.variant = "BITnet6"           # BITnet6 | BITnet6_v101
  c.fs = 4.0                      # feature scale: channels int(64*fs), ..., int(512*fs)
  c.neuron = "bddi"               # bddi (the spiking BITnet) | relu (the seed's "Baseline": the same layers
                                  # with ReLU and softmax cross-entropy, one pass; python -m bitnet_jax.cli.twin)
  c.surrogate = "ste"             # bddi surrogate gradient: ste | triangle | sigmoid | atan [":param"]
  # compute_dtype, matmul_precision, synapses (and remat, below) default to "auto": the fast,
  # accurate path for the platform, resolved once at startup, printed in the run's header and
  # kept by a resumed run (README, "Defaults: auto"; bitnet_jax/defaults.py). An explicit value
  # always wins.
  c.compute_dtype = "auto"        # auto | float32 | bfloat16 | bfloat16x2 | bfloat16x3: the synapses' compute
                                  # (params and membranes stay float32). auto: float32 on CPU, bfloat16 on
                                  # GPU/TPU. bfloat16xN: N bf16 parts of each kernel, float32 sums (x3 keeps
                                  # float32's spikes, but trained 16x slower than bfloat16 on an H200)
  c.matmul_precision = "auto"     # auto | highest | high | default: jax.lax.Precision of every float32 conv
                                  # and matmul, forward and backward. No effect on CPU. highest: true float32
                                  # (slowest on GPU/TPU); high/default: TF32 on Ampere+ GPUs; on TPU 3 / 1
                                  # bf16 passes. auto: highest on CPU, high for float32 on GPU/TPU
  c.synapses = "auto"             # auto | dense | sparse: convs on spikes by a C++ XLA:CPU kernel that skips the
                                  # zeros (CPU only, float32; needs a C++ compiler). auto: sparse on CPU when
                                  # the kernel builds, else dense

  # Time steps (bitnet_jax/engines.py).
  c.time_steps = 50               # time steps T per image in training
  c.eval_time_steps = 50          # time steps T at evaluation (train.py/eval.py --steps N overrides)
  c.engine = "parallel"           # parallel | scan (same results; parallel is faster)
  c.chunk = 0                     # parallel engine: time steps per chunk (bounds memory); 0 = all T at once
  c.eval_chunk = 10               # the same at evaluation (no gradients: chunks cost nothing; every T compiles one chunk)
  c.remat = "auto"                # what backprop keeps: parallel: none | chunk | stream (ste only); scan: none |
                                  # step. auto: stream with parallel + ste (exact, memory flat in T,
                                  # fastest measured), else none

  # Optimisation (bitnet_jax/trainer.py).
  c.loss = "mse_rate"             # mse_rate (the release: MSE of min(counts, T)/T vs one-hot) | xent_rate
  c.logit_scale = 10.0            # xent_rate: logits = logit_scale * counts / T
  c.optimizer = "adamw"           # adamw | sgd (with Nesterov momentum)
  c.learning_rate = 1e-3          # peak learning rate
  c.momentum = 0.9                # sgd only
  c.weight_decay = 5e-4           # decoupled (adamw) or L2 added to the gradient (sgd)
  c.grad_clip = 1.0               # clip the global gradient norm to this; 0 = off
  c.warmup_epochs = 1.0           # linear warm-up, in epochs (fractions allowed)
  c.schedule = "cosine"           # cosine (to 0 at the end) | constant (after warm-up)
  c.batch_size = 32               # global batch (all devices, all hosts)
  c.eval_batch_size = 32          # global evaluation batch (the last batch is padded, never dropped)
  c.num_epochs = 200              # passes over the training split
  c.seed = 0                      # parameter init, data order and augmentation
  c.init_from = ""                # workdir of a trained ReLU twin (python -m bitnet_jax.cli.twin) whose
                                  # latest weights, rescaled by data (twin.balance), start this BITnet
                                  # instead of a random init; "" = random init. Only at step 0.
  c.balance_examples = 2000       # init_from: training images that set each layer's scale
  c.balance_percentile = 99.9     # init_from: percentile of a layer's activations mapped to rate 1

  # Loop, logging and checkpoints.
  c.log_every = 50                # optimizer steps between log lines (also the non-finite-loss check)
  c.eval_every_epochs = 1         # epochs between validations; 0 = only at the end
  c.checkpoint_every = 1000       # optimizer steps between checkpoints (one is also saved each epoch)
  c.keep_checkpoints = 2          # latest checkpoints kept in workdir/checkpoints (the best is kept apart)
  c.max_train_steps = -1          # stop after this many optimizer steps (smoke runs); -1 = num_epochs
  return c
