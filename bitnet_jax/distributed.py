"""Joining a multi-process JAX job (several GPUs, hosts or a TPU pod slice).

Every process of the job runs the same command and calls `initialize` before anything touches a
device. Under a scheduler JAX finds the job on its own (SLURM's variables, Cloud TPU metadata,
Open MPI, ...); without one (a single node, localhost tests) give the coordinator's `host:port`,
the number of processes and this process's id explicitly.

On CPU the processes exchange collectives through gloo (`jax_cpu_collectives_implementation`,
whose default is "gloo" in jax 0.10), so a multi-process run works on one machine without an
accelerator.
"""

import jax

from bitnet_jax import errors


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300):
  """Calls `jax.distributed.initialize`, with the job given explicitly or auto-detected.

  Args:
    coordinator_address: `host:port` of process 0's coordinator service, or None to let JAX
      detect the cluster (SLURM, Cloud TPU, Open MPI, ...; or $JAX_COORDINATOR_ADDRESS).
    num_processes: processes in the job (with `coordinator_address`).
    process_id: this process's id in [0, num_processes) (with `coordinator_address`).
    timeout_s: seconds to wait for all processes to connect, and without a heartbeat from a
      process before the job is declared failed (a hung or killed peer then fails the others
      instead of stalling them forever); also how long a finished process waits for the others
      at exit.

  Raises:
    errors.ConfigError (a ValueError): when only some of the three explicit settings are
      given, or they are invalid.
  """
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) != 3:
    missing = [k for k in explicit if k not in given]
    raise errors.ConfigError(f"distributed: give all of coordinator_address, num_processes and "
                             f"process_id, or none (auto-detection); got {given}, missing "
                             f"{missing}")
  if num_processes is not None and not (isinstance(num_processes, int) and num_processes >= 1):
    raise errors.ConfigError(f"distributed: num_processes must be an int >= 1, got "
                             f"{num_processes!r}")
  if process_id is not None and not (isinstance(process_id, int) and
                                     0 <= process_id < num_processes):
    raise errors.ConfigError(f"distributed: process_id must be an int in [0, {num_processes}), "
                             f"got {process_id!r}")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise errors.ConfigError(f"distributed: coordinator_address must be host:port, got "
                             f"{coordinator_address!r}")
  if not (isinstance(timeout_s, int) and timeout_s >= 1):
    raise errors.ConfigError(f"distributed: timeout_s must be an int >= 1, got {timeout_s!r}")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=timeout_s,
                             shutdown_timeout_seconds=timeout_s)
