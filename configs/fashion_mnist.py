"""A small BITnet on the full Fashion-MNIST (60,000 train / 10,000 test), sized for a 2-core CPU.

  python train.py --config configs/fashion_mnist.py                 # workdir: workdirs/fashion_mnist
  python eval.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist --which latest

Reads the IDX files of Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist;
`--config.data_dir=DIR` for another copy, `--config.data_dir=""` for TFDS).

Defaults from the Fashion-MNIST study (docs/fashion_mnist_study.md): surrogate `ste` (no other
surrogate did better; a leaky clip gradient, `ste+leak:a`, was far worse), loss `mse_rate`
(`xent_rate` lost 19 points at logit_scale 10 and collapsed to 10 % at 30), T = 8 in training
and evaluation (T = 4 stays ~3 points behind even when trained twice as long; T = 16 gave no
gain for 2.3x the compute), AdamW at 2e-3 with a cosine schedule (5e-3 killed a class), batch 32,
no augmentation (`crop_flip` cost 2.4 points at this budget). Evaluate the last checkpoint
(`--which latest`): the "best" checkpoint is chosen on the test split itself.

Measured with the defaults (`auto`: sparse synapses, remat=stream; 2026-12-04, the 2-core CPU,
quiet; docs/benchmarks.md, log in docs/fashion_mnist_auto_run/): 25.9 min wall for the whole
command, test top-1 per epoch 86.71, 88.08, 89.29, 89.72, 90.68, 90.53 %: 90 % first reached
after 21.7 min.
Measured before `auto` (2026-11-28, dense synapses, the defaults of that day; docs/training.md;
log, curve and metrics in docs/fashion_mnist_run/):
  accuracy  90.00 % top-1 on all 10,000 test images at T = 8 (90.31 % when evaluated at 12
            steps); per epoch 86.19, 87.12, 88.98, 89.40, 90.25, 90.00 %.
  time      68.7 min wall for the whole `python train.py --config configs/fashion_mnist.py`
            (6 validations included), 161 % CPU, peak RSS 1.02 GiB.
Its ReLU twin (`python -m bitnet_jax.cli.twin --config configs/fashion_mnist.py`: the same layers,
config and epochs, with ReLU and softmax cross-entropy; 2026-12-02, one seed) reached 92.84 %
(88.91, 90.78, 91.29, 92.35, 92.73, 92.84 % per epoch) in 8.0 CPU minutes: this BITnet trails
it by 2.84 points (docs/fashion_mnist_twin/).
The gap study (docs/gap_study.md; 12,000 images x 2 epochs, the twin beside every run) tried
seven variants of this recipe: three clip gradients outside [0, 1], a data-driven init, hybrid
training, batch 128 and a T = 4 -> 8 curriculum. None beat it (the curriculum matched it for 16 %
less CPU); there it trails the twin by 2.0 points (2 seeds against 3).
The issue's target, >= 93.0 % within 90 min on this CPU, is NOT met. GPU scouting (study,
table 4) found no setting that gets there in the budget: 10 epochs reached 91.1 % after 9 but
would take ~115 min here; fs = 0.5 is ~3x slower per image and no better per epoch.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "fashion_mnist"
  c.data_dir = "/usr/share/datasets/fashion-mnist"
  c.fs = 0.25                     # channels 16, 32, 64, 128; 119,962 parameters
  c.surrogate = "ste"
  c.loss = "mse_rate"
  c.time_steps = 8
  c.eval_time_steps = 8
  c.batch_size = 32
  c.eval_batch_size = 100
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.schedule = "cosine"
  c.warmup_epochs = 0.05          # 94 steps, as in the study
  c.num_epochs = 6                # 1,875 steps/epoch, 11,250 optimizer steps
  c.eval_every_epochs = 1         # a validation after every epoch (~35 s each with the save)
  c.log_every = 100
  return c
