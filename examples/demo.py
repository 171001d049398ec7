"""Trains a small multitask model with and without GradDrop; prints a table.

Three regression tasks share a two-layer tanh trunk; each has a linear head.
The tasks' targets pull shared features in opposite directions, so their
gradients conflict on the trunk. Every method uses the same data, model,
initialisation and Adam settings; only the way the per-task gradients are
combined differs:

* sum: ``jax.grad`` of the summed loss (the baseline);
* GradDrop: per-task gradients + ``graddrop_transform`` (paper eqs. 1-3);
* random GradDrop: the same with ``keep="random"`` (the paper's ablation).

    python examples/demo.py            # ~20 s on 2 CPU cores
    python examples/demo.py --steps 50 --seeds 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_graddrop as ogd

NUM_TASKS, DIM, HIDDEN = 3, 16, 32


def make_data(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Inputs and three targets built from shared, conflicting directions."""
  k_x, k_noise = jax.random.split(key)
  # The same two directions for every split, so train and test share tasks.
  directions = jax.random.normal(jax.random.key(1234), (2, DIM)) / jnp.sqrt(DIM)
  x = jax.random.normal(k_x, (n, DIM))
  a, b = jnp.tanh(x @ directions.T).T
  targets = jnp.stack([a + b, a - b, -a + 0.5 * b**2])
  return x, targets + 0.05 * jax.random.normal(k_noise, targets.shape)


def init_params(key: jax.Array) -> dict[str, jax.Array]:
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "w1": jax.random.normal(k1, (DIM, HIDDEN)) / jnp.sqrt(DIM),
    "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) / jnp.sqrt(HIDDEN),
    "heads": jax.random.normal(k3, (NUM_TASKS, HIDDEN)) / jnp.sqrt(HIDDEN),
    "bias": jnp.zeros((NUM_TASKS,)),
  }


def task_losses(params: dict[str, jax.Array], x: jax.Array, targets: jax.Array) -> jax.Array:
  features = jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"])
  preds = features @ params["heads"].T + params["bias"]
  return jnp.mean((preds.T - targets) ** 2, axis=1)


def train(method: str, seed: int, steps: int, data) -> np.ndarray:
  (x_train, y_train), (x_test, y_test) = data
  params = init_params(jax.random.key(seed))
  if method == "sum":
    tx = optax.adam(3e-3)

    def combined_grads(params, state):
      grads = jax.grad(lambda p: task_losses(p, x_train, y_train).sum())(params)
      return tx.update(grads, state, params)
  else:
    keep = "random" if method == "random GradDrop" else "linear"
    tx = optax.chain(ogd.graddrop_transform(seed, keep=keep), optax.adam(3e-3))
    per_task = ogd.per_task_value_and_grad(task_losses)

    def combined_grads(params, state):
      _, task_grads = per_task(params, x_train, y_train)
      return tx.update(task_grads, state, params)

  @jax.jit
  def step(params, state):
    updates, state = combined_grads(params, state)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return np.asarray(task_losses(params, x_test, y_test))


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args(argv)

  data = (make_data(jax.random.key(0), 512), make_data(jax.random.key(1), 2048))
  methods = ["sum", "GradDrop", "random GradDrop"]
  start = time.perf_counter()
  results = {
    m: np.stack([train(m, seed, args.steps, data) for seed in range(args.seeds)]) for m in methods
  }
  header = " | ".join(f"task {i + 1}" for i in range(NUM_TASKS))
  print(f"Test MSE after {args.steps} Adam steps, mean +- std over {args.seeds} seeds\n")
  print(f"| method | {header} | mean |")
  print("|---|" + "---:|" * (NUM_TASKS + 1))
  for method, losses in results.items():
    cells = " | ".join(f"{m:.4f} +- {s:.4f}" for m, s in zip(losses.mean(0), losses.std(0)))
    print(f"| {method} | {cells} | {losses.mean():.4f} |")
  print(f"\n({time.perf_counter() - start:.1f} s on {jax.devices()[0].device_kind})")
  return results


if __name__ == "__main__":
  main()
