"""Multitask training sharded over 8 devices, checked against one device.

Two setups, each trained twice from the same initialisation and keys, once
on one device and once sharded with ``jax.sharding`` (jit propagates the
shardings; nothing here is home-made):

* data parallel with ``fork``: the batch is sharded over a ``data`` axis and
  the parameters are replicated. ``fork`` sums the sign-weighted cotangents
  over the (sharded) batch, which XLA turns into an all-reduce, so every
  device draws its uniforms for the same marginalised signal and applies the
  same mask;
* model parallel with ``graddrop_transform``: the trunk's hidden units are
  sharded over a ``model`` axis, and so are the per-task gradients.

GradDrop's uniforms come from threefry on global element counters (like
``jax.random`` with ``jax_threefry_partitionable``, the default), so they do
not depend on the sharding. Both kinds of mesh axes work: Explicit (the
default of ``jax.make_mesh``, where arrays carry their sharding in their type)
and Auto (``--axis-types auto``). On CPU, fake the devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_graddrop as ogd

NUM_TASKS, DIM, HIDDEN, BATCH = 4, 16, 64, 64


def _init() -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {
    "trunk": jax.random.normal(k1, (DIM, HIDDEN)) / jnp.sqrt(DIM),
    "heads": jax.random.normal(k2, (NUM_TASKS, HIDDEN)) / jnp.sqrt(HIDDEN),
  }
  x = jax.random.normal(k3, (BATCH, DIM))
  y = jnp.tanh(x @ jax.random.normal(k4, (DIM, NUM_TASKS)))
  return params, x, y


def _task_losses(params: Any, features_fn: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  branches = features_fn(jax.nn.relu(x @ params["trunk"]))
  # Under Explicit axes a product over a sharded dimension names its output
  # sharding (here: the sum over the model axis, replicated).
  out_sharding = None if jax.sharding.get_abstract_mesh().empty else P()
  preds = jnp.stack(
    [jnp.matmul(b, params["heads"][i], out_sharding=out_sharding) for i, b in enumerate(branches)],
    axis=1,
  )
  return jnp.mean((preds - y) ** 2, axis=0)


def train_fork(steps: int, mesh: jax.sharding.Mesh | None) -> Any:
  """Data-parallel training with activation-level GradDrop."""
  params, x, y = _init()
  if mesh is not None:
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    params = jax.device_put(params, NamedSharding(mesh, P()))
  tx = optax.adam(1e-2)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    def loss(params):
      split = lambda f: ogd.fork(f, key, NUM_TASKS)  # noqa: E731
      return _task_losses(params, split, x, y).sum()

    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  key = jax.random.key(1)
  for _ in range(steps):
    key, step_key = jax.random.split(key)
    params, state = step(params, state, step_key)
  return params


def train_transform(steps: int, mesh: jax.sharding.Mesh | None) -> Any:
  """Model-parallel training with parameter-level GradDrop."""
  params, x, y = _init()
  if mesh is not None:
    params = {
      "trunk": jax.device_put(params["trunk"], NamedSharding(mesh, P(None, "model"))),
      "heads": jax.device_put(params["heads"], NamedSharding(mesh, P(None, "model"))),
    }
  tx = optax.chain(ogd.graddrop_transform(2), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    per_task = ogd.per_task_value_and_grad(
      lambda p: _task_losses(p, lambda f: (f,) * NUM_TASKS, x, y)
    )
    _, task_grads = per_task(params)
    updates, state = tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


def _max_difference(a: Any, b: Any) -> float:
  return max(
    float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--tolerance", type=float, default=1e-4)
  parser.add_argument(
    "--axis-types",
    choices=("auto", "explicit"),
    default="explicit",
    help="mesh axis types: Explicit (jax.make_mesh's default) or Auto",
  )
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    sys.exit(
      f"needs 8 devices, found {jax.device_count()}; on CPU set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting Python"
    )
  axis_types = (getattr(jax.sharding.AxisType, args.axis_types.capitalize()),)
  data_mesh = jax.make_mesh((8,), ("data",), axis_types=axis_types)
  model_mesh = jax.make_mesh((8,), ("model",), axis_types=axis_types)
  with jax.set_mesh(data_mesh):
    sharded_fork = train_fork(args.steps, data_mesh)
  with jax.set_mesh(model_mesh):
    sharded_transform = train_transform(args.steps, model_mesh)
  # The model-parallel parameters stay split over the 8 devices.
  assert sharded_transform["trunk"].sharding.spec == P(None, "model")
  assert len(sharded_transform["trunk"].addressable_shards) == 8
  differences = {
    "fork, data parallel": _max_difference(train_fork(args.steps, None), sharded_fork),
    "graddrop_transform, model parallel": _max_difference(
      train_transform(args.steps, None), sharded_transform
    ),
  }
  print(
    f"{jax.device_count()} devices ({jax.devices()[0].device_kind}), {args.axis_types} axes, "
    f"{args.steps} steps"
  )
  for name, diff in differences.items():
    print(f"{name}: max |sharded - single device| over parameters = {diff:.2e}")
  if max(differences.values()) > args.tolerance:
    sys.exit(f"sharded training differs from one device by more than {args.tolerance}")
  return differences


if __name__ == "__main__":
  main()
