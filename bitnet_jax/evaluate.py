"""Evaluation: sums over a padded, sharded test split, and the summary the tables are built from.

`eval_step(params, batch) -> sums` is pure: every entry is a sum over the batch's real examples
(padding has mask 0), so summing the steps' outputs counts every test example exactly once.
"""


import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import run_config
from bitnet_jax import checkpointing
from bitnet_jax import data
from bitnet_jax import engines
from bitnet_jax import interop
from bitnet_jax import sharding
from bitnet_jax import losses
from bitnet_jax import twin

SCORES = ("count", "potential")


def make_eval_step(module, *, time_steps: int, mean, std, loss: str = "mse_rate",
                   logit_scale: float = 10.0, engine: str = "parallel",
                   chunk: int = engines.EVAL_CHUNK,
                   sweep: tuple[int, ...] = (), score: str = "count", neuron: str = "bddi"):
  """Builds the jitted `eval_step(params, batch) -> dict of sums`.

  Args:
    module: the BITnet module.
    time_steps: time steps T of the run.
    mean, std: per-channel normalisation of the dataset.
    loss, logit_scale: the loss reported (see losses.py).
    engine, chunk: time engine and, for `parallel`, time steps per chunk (see engines.py; the
      default `engines.EVAL_CHUNK` compiles the same chunk for every T; 0 = all T at once).
    sweep: extra step counts t <= T at which top-1 is also measured, from the same run.
    score: "count" (the release: argmax of spike counts, first maximum on ties) or "potential"
      (counts + the last layer's residual membrane, which breaks most ties).
    neuron: "bddi" (the BITnet) or "relu" (its ReLU twin, `twin.py`: one pass, scores are the
      logits, the loss is softmax cross-entropy, `layer_spikes` counts non-zero activations;
      summarize it with time_steps=1).
  """
  if twin.check_neuron(neuron) == "relu" and (sweep or score != "count"):
    raise ValueError("the ReLU twin has no time steps: no sweep, and score must be 'count'")
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}: expected one of {SCORES}")
  bad = [t for t in sweep if not 1 <= t <= time_steps]
  if bad:
    raise ValueError(f"sweep steps must be in [1, {time_steps}] (the run's time steps), got {bad}")

  @jax.jit
  def eval_step(params, batch):
    images = data.normalize(batch["image"], mean, std)  # (B, H, W, C)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    if neuron == "relu":
      scores, layer_active = twin.forward(module, params, images)    # (B, K), (B, 6)
      per_example = twin.per_example_loss(scores, labels)
    else:
      trace = engines.run(module, params, images, time_steps, engine=engine, chunk=chunk)
      counts = trace.out_spikes.sum(0)                               # (B, K)
      scores = counts if score == "count" else counts + trace.final_state
      per_example = losses.per_example_loss(loss, counts, labels, time_steps, logit_scale)
      layer_active = trace.layer_spikes                              # (B, 6)
    top1 = jnp.argmax(scores, -1) == labels                          # first maximum on ties
    _, top5 = jax.lax.top_k(scores, min(5, scores.shape[-1]))        # lower index first on ties
    tied = jnp.sum(scores == scores.max(-1, keepdims=True), -1) > 1  # the tie decided the argmax
    sums = {
        "n": mask.sum(),
        "correct1": (top1 * mask).sum(),
        "correct5": (jnp.any(top5 == labels[:, None], -1) * mask).sum(),
        "loss": (per_example * mask).sum(),
        "ties": (tied * mask).sum(),
        "layer_spikes": (layer_active * mask[:, None]).sum(0),       # (6,)
    }
    if sweep:
      partial = jnp.cumsum(trace.out_spikes, 0)[jnp.asarray(sweep) - 1]  # (S, B, K)
      hits = jnp.argmax(partial, -1) == labels                            # (S, B)
      sums["sweep_correct1"] = (hits * mask).sum(-1)                      # (S,)
    return sums

  return eval_step


def evaluate(eval_step, params, batches, mesh) -> dict:
  """Sums `eval_step` over all batches (dicts of host arrays), on the devices of `mesh`."""
  total = None
  for batch in batches:
    sums = eval_step(params, sharding.shard_batch(batch, mesh))
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  if total is None:
    raise ValueError("the evaluation split is empty")
  return jax.tree_util.tree_map(np.asarray, jax.device_get(total))


def summarize(sums: dict, module, time_steps: int, sweep: tuple[int, ...] = ()) -> dict:
  """Turns sums into metrics: accuracies in [0, 1], mean loss, tie rate, sparsity in %."""
  n = float(sums["n"])
  neurons = np.array([np.prod(spec.shape) for spec in module.plan()], np.float64)
  fired = np.asarray(sums["layer_spikes"], np.float64) / (n * time_steps * neurons)
  out = {
      "n": int(n), "time_steps": time_steps,
      "top1": float(sums["correct1"]) / n, "top5": float(sums["correct5"]) / n,
      "loss": float(sums["loss"]) / n, "tie_rate": float(sums["ties"]) / n,
      "sparsity": [float(100 * (1 - f)) for f in fired],  # % zeros per layer, layers 1..6
  }
  if sweep:
    out["sweep_top1"] = {int(t): float(c) / n for t, c in zip(sweep, sums["sweep_correct1"])}
  return out


def run_evaluation(config, *, workdir: str | None = None, which: str = "best",
                   checkpoint_step: int | None = None, torch_ckpt: str | None = None,
                   sweep: tuple[int, ...] = (), score: str = "count", log=print) -> dict:
  """Evaluates a checkpoint on the whole test split of `config.dataset`.

  Args:
    config: the run's config; `eval_time_steps` is the number of time steps T.
    workdir: a training workdir (orbax checkpoints), or None with `torch_ckpt`.
    which: "best" or "latest" checkpoint of the workdir.
    checkpoint_step: a specific step of workdir/checkpoints.
    torch_ckpt: a .ckpt of the original PyTorch release instead of a workdir.
    sweep: step counts to also report top-1 at (from the same run; T is raised to their max).
    score: "count" or "potential" (see `make_eval_step`).
    log: prints the resolved compute settings (process 0): the config's "auto" fields resolve
      for this platform, and to float32 at `highest` for `torch_ckpt` (the release's spikes).

  Returns:
    The metrics of `summarize`, plus "checkpoint" (where the parameters came from).
  """
  config, resolution = run_config.resolve(config, fidelity=bool(torch_ckpt))
  if jax.process_index() == 0:
    for line in (resolution.describe(),) + resolution.notes:
      log(line)
  info = run_config.dataset_info(config)
  module = run_config.make_module(config, info)
  if torch_ckpt:
    params = interop.to_flax_params(
        interop.read_state_dict(torch_ckpt), variant=config.variant, fs=config.fs,
        num_classes=info.num_classes, img_size=module.img_size, in_channels=module.in_channels)
    source = torch_ckpt
  elif workdir:
    params, meta = checkpointing.load_params(
        workdir, which, checkpoint_step, log=log if jax.process_index() == 0 else lambda _: None)
    checkpointing.check_architecture(meta["arch"], checkpointing.architecture(module),
                                     meta["source"])
    source = meta["source"]
  else:
    raise ValueError("nothing to evaluate: give a workdir or a torch_ckpt")
  sweep = tuple(sorted(set(sweep)))
  time_steps = max((config.eval_time_steps,) + sweep)
  mesh = sharding.data_mesh()
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  neuron = config.neuron
  eval_step = make_eval_step(module, time_steps=time_steps, mean=info.mean, std=info.std,
                             loss=config.loss, logit_scale=config.logit_scale,
                             engine=config.engine, chunk=config.eval_chunk, sweep=sweep,
                             score=score, neuron=neuron)
  sums = evaluate(eval_step, params, run_config.eval_iter(config, info), mesh)
  result = summarize(sums, module, 1 if neuron == "relu" else time_steps, sweep)
  result.update(checkpoint=source, dataset=info.name, score=score)
  return result


def sparsity_table(result: dict, label: str) -> str:
  """The seed's sparsity table row: % zeros of each layer's spikes."""
  head = "| Dataset - Model | " + " | ".join(f"Layer{i}" for i in range(1, 7)) + " |"
  rule = "|:---|" + "---:|" * 6
  row = f"| {label} | " + " | ".join(f"{s:.2f}%" for s in result["sparsity"]) + " |"
  return "\n".join([head, rule, row])


def sweep_table(result: dict) -> str:
  rows = ["| time steps | top-1 |", "|---:|---:|"]
  rows += [f"| {t} | {100 * a:.2f}% |" for t, a in result["sweep_top1"].items()]
  return "\n".join(rows)
