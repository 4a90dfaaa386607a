"""Throughput of the training input pipeline: images/s delivered to the host.

Reads CIFAR-shaped (32x32x3, 50,000 examples) and Tiny-ImageNet-shaped (64x64x3) uint8 data
held in memory (the 'synthetic' dataset), batch 128, and prints one table row per
(shape, augment, num_workers). Nothing is sent to a device.

Command (from the repository root):

    python -m benchmarks.input_pipeline            # about a minute on 2 CPU cores
    python -m benchmarks.input_pipeline --batches 100 --workers 0

Target: >= 20,000 images/s with crop_flip on CIFAR-shaped data.
"""

import argparse
import itertools
import time

from bitnet_jax import data


def measure(spec: data.DataSpec, batches: int, warmup: int = 20, **pipeline) -> float:
  """Images/s over `batches` batches, after `warmup` batches (worker start-up, caches).

  `pipeline`: the keyword arguments of `data.train_iter` (batch_size, augment, num_workers).
  """
  it = data.train_iter(data.get_source(spec, "train"), data.get_dataset_info(spec), **pipeline)
  for _ in itertools.islice(it, warmup):
    pass
  start = time.perf_counter()
  images = sum(len(b["label"]) for b in itertools.islice(it, batches))
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return images / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=300, help="timed batches per row")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                      help="num_workers values to try")
  args = parser.parse_args()
  rows = [((32, 32, 3), 50_000), ((64, 64, 3), 10_000)]
  print(f'{"dataset shape":>15} {"examples":>9} {"augment":>10} {"workers":>8} {"images/s":>10}')
  for (shape, num_train), augment, workers in itertools.product(rows, ("none", "crop_flip"),
                                                                 args.workers):
    spec = data.DataSpec("synthetic", synthetic_num_train=num_train,
                         synthetic_num_test=args.batch_size, synthetic_image_shape=shape)
    data.get_dataset_info(spec)  # generate the data outside the timing
    rate = measure(spec, args.batches, batch_size=args.batch_size, augment=augment,
                   num_workers=workers)
    print(f'{"x".join(map(str, shape)):>15} {num_train:>9} {augment:>10} {workers:>8} '
          f"{rate:>10,.0f}", flush=True)


if __name__ == "__main__":
  main()
