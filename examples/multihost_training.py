"""Multitask training on one process or on several (JAX's multi-controller runtime).

Every process runs this same script. The batch is sharded over all devices of
all processes; each process builds only its own rows of every batch
(``jax.make_array_from_process_local_data``); the parameters, the optimizer
state and the keys are replicated, so every process draws the same GradDrop
uniforms. It trains the same model two ways (``--methods``), each with
checkpoints (orbax, written by all processes together, under ``--out``) that
any number of processes can restore:

* ``fork``: activation-level GradDrop (``fork``), data parallel: the
  batch marginalisation inside ``fork`` becomes an all-reduce;
* ``streaming``: parameter-level GradDrop
  (``graddrop_value_and_grad``), data parallel: the per-task gradients are
  all-reduced over the batch before GradDrop combines them.

On one machine with CPU devices (gloo collectives between processes)::

    python examples/multihost_training.py --devices 4 --out /tmp/run1
    python examples/multihost_training.py --devices 2 --out /tmp/run2 \\
      --num-processes 2 --process-id 0 --coordinator 127.0.0.1:12345 &
    python examples/multihost_training.py --devices 2 --out /tmp/run2 \\
      --num-processes 2 --process-id 1 --coordinator 127.0.0.1:12345

On a GPU cluster or a TPU pod, one process per host, with the cluster's own
launcher (Slurm, Open MPI, or the TPU runtime)::

    python examples/multihost_training.py --cluster --out gs://bucket/run

``--cluster`` calls ``jax.distributed.initialize()`` with no arguments, which
detects the coordinator, the process count and the process id there.
``--resume`` continues from the latest checkpoint in ``--out``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

NUM_TASKS, DIM, HIDDEN, GLOBAL_BATCH, DATASET = 4, 16, 64, 64, 1024


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--methods", nargs="+", choices=("fork", "streaming"), default=["fork", "streaming"]
  )
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--checkpoint-every", type=int, default=5)
  parser.add_argument("--out", required=True, help="checkpoints and final parameters")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  parser.add_argument("--devices", type=int, default=None, help="CPU devices of this process")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--cluster", action="store_true", help="detect the cluster (GPU, TPU)")
  parser.add_argument(
    "--heartbeat-timeout", type=int, default=100, help="seconds before a lost peer is an error"
  )
  return parser.parse_args(argv)


def _start_jax(args: argparse.Namespace) -> Any:
  """Imports jax with the devices and the distributed runtime asked for."""
  if args.devices is not None:
    # Fixed when jax starts: CPU devices to fake on this process.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
  import jax

  if args.cluster:
    jax.distributed.initialize()
  elif args.num_processes > 1:
    # Collectives between CPU processes go through gloo (GPUs and TPUs have
    # their own); a peer that stops answering is an error after the timeout.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      heartbeat_timeout_seconds=args.heartbeat_timeout,
    )
  return jax


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse(argv)
  jax = _start_jax(args)
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_graddrop as ogd

  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  # The dataset: every process can name every row, but loads only its own.
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(DATASET, DIM)).astype(np.float32)
  targets = np.tanh(inputs @ rng.normal(size=(DIM, NUM_TASKS))).astype(np.float32)
  targets[:, 1] *= -1.0  # two pairs of tasks that pull the trunk apart

  def local_batch(step: int) -> tuple[Any, Any]:
    rows = (np.arange(GLOBAL_BATCH) + step * GLOBAL_BATCH) % DATASET
    per_process = GLOBAL_BATCH // jax.process_count()
    mine = rows[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
    return tuple(
      jax.make_array_from_process_local_data(by_rows, array[mine], (GLOBAL_BATCH, array.shape[1]))
      for array in (inputs, targets)
    )

  def task_losses(params: Any, x: Any, y: Any, split: Any) -> Any:
    branches = split(jax.nn.relu(x @ params["trunk"]))
    preds = jnp.stack([b @ params["heads"][i] for i, b in enumerate(branches)], axis=1)
    return jnp.mean((preds - y) ** 2, axis=0)

  def gradients(method: str, params: Any, x: Any, y: Any, key: Any) -> Any:
    if method == "fork":
      split = lambda f: ogd.fork(f, key, NUM_TASKS)  # noqa: E731
      return jax.grad(lambda p: task_losses(p, x, y, split).sum())(params)
    same = lambda f: (f,) * NUM_TASKS  # noqa: E731
    _, grads = ogd.graddrop_value_and_grad(lambda p: task_losses(p, x, y, same), key, chunk_size=1)(
      params
    )
    return grads

  tx = optax.adam(1e-2)

  def train(method: str) -> dict[str, Any]:
    @jax.jit
    def train_step(state: dict[str, Any], x: Any, y: Any) -> dict[str, Any]:
      key = jax.random.fold_in(jax.random.key(1), state["step"])  # the same on every process
      grads = gradients(method, state["params"], x, y, key)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
      }

    init_keys = jax.random.split(jax.random.key(0))
    params = {
      "trunk": jax.random.normal(init_keys[0], (DIM, HIDDEN)) / np.sqrt(DIM),
      "heads": jax.random.normal(init_keys[1], (NUM_TASKS, HIDDEN)) / np.sqrt(HIDDEN),
    }
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state, replicated)

    directory = os.path.join(os.path.abspath(args.out), method)
    manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
        save_interval_steps=args.checkpoint_every, max_to_keep=3, create=True
      ),
    )
    start = manager.latest_step() if args.resume else None
    if start is not None:
      # Restore onto this run's devices, whatever the run that saved it had.
      target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state
      )
      state = manager.restore(start, args=ocp.args.StandardRestore(target))
      print(f"process {jax.process_index()}: {method} resumed at step {start}", flush=True)
    for step in range(start or 0, args.steps):
      state = train_step(state, *local_batch(step))
      if (step + 1) % args.checkpoint_every == 0:
        manager.save(step + 1, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
        print(f"process {jax.process_index()}: {method} checkpoint {step + 1} saved", flush=True)
    manager.close()

    final = jax.tree.map(np.asarray, state["params"])  # replicated: every process has it all
    if jax.process_index() == 0:
      np.savez(os.path.join(directory, "final_params.npz"), **final)
    print(
      f"process {jax.process_index()} of {jax.process_count()}: {method}, "
      f"{jax.device_count()} devices, step {int(state['step'])}, "
      f"trunk norm {float(np.linalg.norm(final['trunk'])):.6f}",
      flush=True,
    )
    return final

  return {method: train(method) for method in args.methods}


if __name__ == "__main__":
  main()
