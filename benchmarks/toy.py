"""Toy landscapes: where does each way of combining two gradients end up?

1. CAGrad's two-objective landscape in R^2
   (``optax_graddrop.problems.two_objective_losses``): Adam (lr 1e-3) on
   the combined gradient of ``x`` from CAGrad's three starting points and a
   7x7 grid of starts, for 100k steps, 5 seeds each. Reports the final losses,
   the distance to the Pareto set and the share of runs that reach it
   (distance < 0.05).
2. A 1-D landscape with one joint minimum
   (``optax_graddrop.problems.multi_minimum_losses``): 500 random starts in
   [-10, 10], each with its own key; the share that ends at the joint minimum
   (|x| < 0.1) with SGD and with Adam.

Methods: ``mean`` (the plain average), ``GradDrop`` (parameter level on
``x``: its two coordinates are the "scalars"), ``random GradDrop``,
``PCGrad`` and ``MGDA``.

    python benchmarks/toy.py            # full, ~2 min on 2 CPUs
    python benchmarks/toy.py --quick    # seconds; writes nothing
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_graddrop as ogd
from optax_graddrop import problems

# (task_grads [T, D], key) -> the update direction [D].
METHODS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  "mean": lambda g, key: ogd.mean_tasks(g),
  "GradDrop": lambda g, key: ogd.graddrop(g, key),
  "random GradDrop": lambda g, key: ogd.graddrop(g, key, keep="random"),
  "PCGrad": ogd.pcgrad,
  "MGDA": lambda g, key: ogd.mgda(g),
}
REACHED = 0.05  # distance to the Pareto set that counts as reaching it
JOINT = 0.1  # |x| that counts as the joint minimum of the 1-D toy


def optimize(
  losses_fn: Callable[[jax.Array], jax.Array],
  combine: Callable[[jax.Array, jax.Array], jax.Array],
  optimizer: optax.GradientTransformation,
  starts: jax.Array,
  keys: jax.Array,
  steps: int,
  record_every: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
  """Runs every start (with its key) for ``steps``; final points and trajectories.

  Trajectories, when ``record_every > 0``, have shape
  ``[starts, steps // record_every + 1, ...]``, beginning at the starts.
  """

  def one(x0: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    def step(carry: Any, step_key: jax.Array) -> tuple[Any, None]:
      x, state = carry
      task_grads = jax.jacrev(losses_fn)(x)
      updates, state = optimizer.update(combine(task_grads, step_key), state, x)
      return (optax.apply_updates(x, updates), state), None

    def segment(carry: Any, segment_keys: jax.Array) -> tuple[Any, jax.Array]:
      carry, _ = jax.lax.scan(step, carry, segment_keys)
      return carry, carry[0]

    every = record_every or steps
    step_keys = jax.random.split(key, steps).reshape(steps // every, every)
    (x, _), path = jax.lax.scan(segment, (x0, optimizer.init(x0)), step_keys)
    return x, jnp.concatenate([x0[None], path])

  finals, paths = jax.jit(jax.vmap(one))(starts, keys)
  return finals, paths if record_every else None


def pareto_distance(points: np.ndarray, pareto: np.ndarray) -> np.ndarray:
  """Distance from each point to the nearest of the (dense) Pareto points."""
  return np.min(np.linalg.norm(points[:, None, :] - pareto[None], axis=-1), axis=1)


def run_landscape(steps: int, seeds: int, grid: int, record_every: int) -> dict[str, Any]:
  """Both parts of part 1: canonical starts (with trajectories) and the grid."""
  canonical = np.array(problems.TWO_OBJECTIVE_STARTS, np.float32)
  x1, x2 = np.meshgrid(np.linspace(-9, 9, grid), np.linspace(-8, 9, grid))
  grid_starts = np.stack([x1.ravel(), x2.ravel()], axis=1).astype(np.float32)
  starts = np.repeat(np.concatenate([canonical, grid_starts]), seeds, axis=0)
  keys = jax.random.split(jax.random.key(0), len(starts))
  pareto = problems.two_objective_pareto_set(2001)
  results = {}
  for name, combine in METHODS.items():
    finals, paths = optimize(
      problems.two_objective_losses,
      combine,
      optax.adam(1e-3),
      jnp.asarray(starts),
      keys,
      steps,
      record_every,
    )
    finals = np.asarray(finals, np.float64)
    losses = np.asarray(jax.vmap(problems.two_objective_losses)(jnp.asarray(finals)))
    results[name] = {
      "losses": losses.reshape(-1, seeds, 2),
      "distance": pareto_distance(finals, pareto).reshape(-1, seeds),
      "paths": np.asarray(paths)[: len(canonical) * seeds : seeds],
    }
  return {"methods": results, "num_canonical": len(canonical), "pareto": pareto}


def run_multi_minimum(steps: int, num_starts: int) -> dict[str, dict[str, np.ndarray]]:
  """Final points of the 1-D toy per method and optimizer."""
  starts = jax.random.uniform(jax.random.key(1), (num_starts,), minval=-10.0, maxval=10.0)
  keys = jax.random.split(jax.random.key(2), num_starts)
  optimizers = {"SGD lr 0.05": optax.sgd(0.05), "Adam lr 0.01": optax.adam(1e-2)}
  return {
    name: {
      opt_name: np.asarray(
        optimize(problems.multi_minimum_losses, combine, opt, starts, keys, steps)[0]
      )
      for opt_name, opt in optimizers.items()
    }
    for name, combine in METHODS.items()
  }


def tables(landscape: dict[str, Any], multi_minimum: dict[str, Any], seeds: int) -> str:
  canonical_rows, grid_rows = [], []
  n = landscape["num_canonical"]
  for name, r in landscape["methods"].items():
    for i, start in enumerate(problems.TWO_OBJECTIVE_STARTS):
      losses, distance = r["losses"][i], r["distance"][i]
      canonical_rows.append(
        [
          name,
          str(start),
          _common.mean_std(losses[:, 0]),
          _common.mean_std(losses[:, 1]),
          _common.mean_std(losses.mean(1)),
          _common.mean_std(distance, digits=3),
          f"{np.mean(distance < REACHED):.0%}",
        ]
      )
    grid_distance, grid_losses = r["distance"][n:], r["losses"][n:]
    grid_rows.append(
      [
        name,
        f"{np.mean(grid_distance < REACHED):.0%}",
        f"{np.median(grid_losses.mean(-1)):.2f}",
        f"{np.median(grid_distance):.3f}",
      ]
    )
  canonical = _common.markdown_table(
    ["method", "start", "L1", "L2", "mean", "distance to Pareto set", "reached"], canonical_rows
  )
  grid = _common.markdown_table(
    ["method", "reached", "median final mean loss", "median distance"], grid_rows
  )
  opt_names = list(next(iter(multi_minimum.values())))
  one_d = _common.markdown_table(
    ["method", *(f"joint minimum, {o}" for o in opt_names)],
    [
      [name, *(f"{np.mean(np.abs(finals[o]) < JOINT):.1%}" for o in opt_names)]
      for name, finals in multi_minimum.items()
    ],
  )
  num_grid = len(next(iter(landscape["methods"].values()))["distance"]) - n
  num_starts = len(next(iter(multi_minimum.values()))[opt_names[0]])
  return (
    f"## Two-objective landscape: CAGrad's starts, {seeds} seeds each\n\n{canonical}\n\n"
    f"## Two-objective landscape: {num_grid} grid starts x {seeds} seeds\n\n{grid}\n\n"
    f"## 1-D landscape: share of {num_starts} random starts ending at the joint minimum\n\n"
    f"{one_d}"
  )


def figure(landscape: dict[str, Any], multi_minimum: dict[str, Any]) -> Any:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = list(landscape["methods"])
  fig = plt.figure(figsize=(3.2 * len(methods), 6.4))
  grid = fig.add_gridspec(2, len(methods))
  x1, x2 = np.meshgrid(np.linspace(-10, 10, 200), np.linspace(-10, 10, 200))
  points = jnp.asarray(np.stack([x1.ravel(), x2.ravel()], 1), jnp.float32)
  mean_loss = np.asarray(jax.vmap(problems.two_objective_losses)(points)).mean(1).reshape(x1.shape)
  pareto = landscape["pareto"]
  for column, name in enumerate(methods):
    ax = fig.add_subplot(grid[0, column])
    ax.contourf(x1, x2, mean_loss, levels=30, cmap="viridis", alpha=0.8)
    ax.plot(pareto[:, 0], pareto[:, 1], "w-", linewidth=2)
    for path in landscape["methods"][name]["paths"]:
      ax.plot(path[:, 0], path[:, 1], "r-", linewidth=1.2)
      ax.plot(path[0, 0], path[0, 1], "ko", markersize=4)
      ax.plot(path[-1, 0], path[-1, 1], "r*", markersize=9)
    ax.set_title(name)
    ax.set_xticks([]), ax.set_yticks([])
  ax = fig.add_subplot(grid[1, :2])
  xs = np.linspace(-10, 10, 1000)
  values = np.asarray(jax.vmap(problems.multi_minimum_losses)(jnp.asarray(xs)))
  ax.plot(xs, values[:, 0], label="L1")
  ax.plot(xs, values[:, 1], label="L2")
  ax.plot(xs, values.sum(1), "k--", label="L1 + L2")
  ax.set_title("1-D landscape (joint minimum at 0)")
  ax.legend(fontsize=8)
  ax = fig.add_subplot(grid[1, 2:])
  opt_names = list(next(iter(multi_minimum.values())))
  width = 0.8 / len(opt_names)
  for i, opt_name in enumerate(opt_names):
    shares = [np.mean(np.abs(multi_minimum[m][opt_name]) < JOINT) for m in methods]
    ax.bar(np.arange(len(methods)) + i * width, shares, width, label=opt_name)
  ax.set_xticks(np.arange(len(methods)) + width / 2, methods)
  ax.set_ylabel("share ending at the joint minimum")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def main(argv: Sequence[str] | None = None) -> str:
  args = _common.argument_parser(__doc__, steps=100_000).parse_args(argv)
  if args.quick:
    steps, seeds, grid, record, one_d_steps, one_d_starts = 200, 2, 2, 50, 200, 16
  else:
    steps, seeds, grid, record = args.steps, args.seeds, 7, 100
    one_d_steps, one_d_starts = 5000, 500
  from tqdm import tqdm

  with tqdm(total=2, desc="toy landscapes", disable=args.quick) as progress:
    landscape = run_landscape(steps, seeds, grid, record)
    progress.update()
    multi_minimum = run_multi_minimum(one_d_steps, one_d_starts)
    progress.update()
  text = (
    f"# Toy landscapes\n\nTwo-objective: Adam lr 1e-3, {steps} steps; reached = distance to "
    f"the Pareto set < {REACHED}. 1-D: {one_d_steps} steps; joint minimum = |x| < {JOINT}.\n\n"
    f"{tables(landscape, multi_minimum, seeds)}\n\nMachine: {_common.machine()}"
  )
  _common.report(args, "toy", text, lambda: figure(landscape, multi_minimum))
  return text


if __name__ == "__main__":
  main()
