"""Speed of GradDrop against the floor: the fastest jitted plain sum.

Times, interleaved in one process, the jitted plain sum of a stacked float32
gradient of T tasks and N entries per task (summing the T slices, the
fastest form on XLA:CPU) and ``graddrop`` / ``graddrop_transform`` on the
same stack, and prints a markdown table of median times and ratios to the
floor, with the machine noted.

    python benchmarks/speed.py            # T = 8, N = 10M
    python benchmarks/speed.py --quick    # a small size, seconds
    python benchmarks/speed.py --tasks 2 8 40 --size 1000000

A last table shows how the cost grows with the number of tasks T (2, 8, 40:
CelebA has 40): graddrop's time per task, its compiled scratch memory (in
units of one task's gradient; no [T, N] temporary means it stays flat), and
the fork training step relative to the plain step with T heads.

Then times jitted training steps (gradient + Adam update) of multitask
models, interleaved: the plain summed-loss step, the same model with
``fork`` (activation-level GradDrop, one backward pass) and the
parameter-level form (``per_task_value_and_grad`` + ``graddrop_transform``),
as ratios to the plain step. Models: an MLP trunk 512-1024-1024 with 8
linear heads (batch 256) and a small conv trunk (two 3x3 convs, 8 heads).

If ``torch`` and ``torchjd`` are installed, also times torchjd's GradDrop
aggregator on the same matrix (relative to torch's own plain sum).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import optax

import optax_graddrop as ogd


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds per call, each method timed in turn every round."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in samples.items()}


def _torchjd_methods(task_grads: jax.Array) -> dict[str, Callable[[], Any]]:
  try:
    import numpy as np
    import torch
    from torchjd.aggregation import GradDrop
  except ImportError:
    return {}
  matrix = torch.from_numpy(np.asarray(task_grads))
  aggregator = GradDrop()
  return {
    "torch plain sum": lambda: matrix.sum(0),
    "torchjd GradDrop": lambda: aggregator(matrix),
  }


def _torchjd_training_steps(widths: Sequence[int], batch: int, num_tasks: int, repeats: int):
  """torch: plain summed-loss Adam step vs torchjd's mtl_backward + GradDrop step."""
  try:
    import torch
    from torchjd.aggregation import GradDrop
    from torchjd.autojac import jac_to_grad
    from torchjd.autojac import mtl_backward
  except ImportError:
    return []
  torch.manual_seed(0)
  layers = []
  for m, n in itertools.pairwise(widths):
    layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
  trunk = torch.nn.Sequential(*layers)
  heads = torch.nn.ModuleList([torch.nn.Linear(widths[-1], 1) for _ in range(num_tasks)])
  optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
  x, y = torch.randn(batch, widths[0]), torch.randn(batch, num_tasks)
  aggregator = GradDrop()

  def losses():
    features = trunk(x)
    per_task = [((h(features)[:, 0] - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
    return per_task, features

  def plain_step():
    optimizer.zero_grad()
    per_task, _ = losses()
    sum(per_task).backward()
    optimizer.step()

  def torchjd_step():
    optimizer.zero_grad()
    per_task, features = losses()
    mtl_backward(per_task, features)
    jac_to_grad(list(trunk.parameters()), aggregator)
    optimizer.step()

  times = _interleaved_medians(
    {"torch plain step": plain_step, "torchjd GradDrop step": torchjd_step}, repeats
  )
  return [
    (
      "torchjd mtl_backward + GradDrop step (vs torch plain step)",
      times["torchjd GradDrop step"] / times["torch plain step"],
      times["torchjd GradDrop step"],
    )
  ]


def _plain_sum(task_grads: jax.Array) -> jax.Array:
  total = task_grads[0]
  for i in range(1, task_grads.shape[0]):
    total = total + task_grads[i]
  return total


def run(num_tasks: int, size: int, repeats: int) -> list[dict[str, Any]]:
  """Times every method on a ``[num_tasks, size]`` float32 stack."""
  task_grads = jax.random.normal(jax.random.key(0), (num_tasks, size), jnp.float32)
  key = jax.random.key(1)
  floor = jax.jit(_plain_sum)
  naive = jax.jit(lambda g: g.sum(0))
  drop = jax.jit(lambda g, k: ogd.graddrop(g, k))
  drop_stats = jax.jit(lambda g, k: ogd.graddrop(g, k, return_stats=True))
  drop_norm = jax.jit(lambda g, k: ogd.graddrop(g, k, preserve_norm=True))
  tx = ogd.graddrop_transform(0)
  state = tx.init(task_grads[0])
  update = jax.jit(tx.update)
  fns: dict[str, Callable[[], Any]] = {
    "plain sum (floor)": lambda: floor(task_grads),
    "sum over task axis": lambda: naive(task_grads),
    "graddrop": lambda: drop(task_grads, key),
    "graddrop + stats": lambda: drop_stats(task_grads, key),
    "graddrop preserve_norm": lambda: drop_norm(task_grads, key),
    "graddrop_transform.update": lambda: update(task_grads, state),
  }
  times = _interleaved_medians(fns, repeats)
  rows = [
    {
      "tasks": num_tasks,
      "size": size,
      "method": name,
      "seconds": t,
      "ratio": t / times["plain sum (floor)"],
    }
    for name, t in times.items()
  ]
  torch_fns = _torchjd_methods(task_grads)
  if torch_fns:
    torch_times = _interleaved_medians(torch_fns, repeats)
    base = torch_times["torch plain sum"]
    rows += [
      {
        "tasks": num_tasks,
        "size": size,
        "method": f"{name} (vs torch sum)",
        "seconds": t,
        "ratio": t / base,
      }
      for name, t in torch_times.items()
    ]
    rows.append(
      {
        "tasks": num_tasks,
        "size": size,
        "method": "torchjd GradDrop / graddrop",
        "seconds": torch_times["torchjd GradDrop"],
        "ratio": torch_times["torchjd GradDrop"] / times["graddrop"],
      }
    )
  return rows


def _mlp(widths: Sequence[int], num_tasks: int) -> tuple[Any, Callable, Callable]:
  """An MLP trunk with linear heads: (params, trunk_fn, heads_fn)."""
  keys = jax.random.split(jax.random.key(0), len(widths))
  trunk = [
    jax.random.normal(k, (m, n)) / jnp.sqrt(m) for k, m, n in zip(keys, widths[:-1], widths[1:])
  ]
  heads = jax.random.normal(keys[-1], (widths[-1], num_tasks)) / jnp.sqrt(widths[-1])

  def trunk_fn(trunk, x):
    for w in trunk:
      x = jax.nn.relu(x @ w)
    return x

  return {"trunk": trunk, "heads": heads}, trunk_fn, lambda heads, f: f @ heads


def _conv(channels: int, num_tasks: int) -> tuple[Any, Callable, Callable]:
  """Two 3x3 convs on 16x16 images, global average pooling, linear heads."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  trunk = [
    jax.random.normal(k1, (3, 3, 3, channels)) / 5,
    jax.random.normal(k2, (3, 3, channels, channels)) / jnp.sqrt(9 * channels),
  ]
  heads = jax.random.normal(k3, (channels, num_tasks)) / jnp.sqrt(channels)

  def trunk_fn(trunk, x):
    for w in trunk:
      x = jax.nn.relu(
        jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
      )
    return x.mean(axis=(1, 2))

  return {"trunk": trunk, "heads": heads}, trunk_fn, lambda heads, f: f @ heads


def run_training_steps(
  name: str, model: tuple[Any, Callable, Callable], x: jax.Array, num_tasks: int, repeats: int
) -> list[dict[str, Any]]:
  """Times jitted Adam steps of the plain sum, fork and parameter-level GradDrop."""
  params, trunk_fn, heads_fn = model
  y = jax.random.normal(jax.random.key(1), (x.shape[0], num_tasks))

  def task_losses_of(branches, heads):
    # Head i reads branch i, in both the plain and the fork step.
    preds = jnp.stack(
      [heads_fn(heads[:, i : i + 1], b)[:, 0] for i, b in enumerate(branches)], axis=1
    )
    return jnp.mean((preds - y) ** 2, axis=0)

  def plain_loss(params, key):
    del key
    features = trunk_fn(params["trunk"], x)
    return task_losses_of((features,) * num_tasks, params["heads"]).sum()

  def fork_loss(params, key):
    # One backward pass delivers the T cotangents of the features to fork.
    branches = ogd.fork(trunk_fn(params["trunk"], x), key, num_tasks)
    return task_losses_of(branches, params["heads"]).sum()

  def per_task_losses(params):
    features = trunk_fn(params["trunk"], x)
    return task_losses_of((features,) * num_tasks, params["heads"])

  adam = optax.adam(1e-3)
  per_task_tx = optax.chain(ogd.graddrop_transform(0, track_stats=False), optax.adam(1e-3))

  def summed_step(loss_fn):
    @jax.jit
    def step(params, state, key):
      grads = jax.grad(loss_fn)(params, key)
      updates, state = adam.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  @jax.jit
  def per_task_step(params, state, key):
    del key
    _, task_grads = ogd.per_task_value_and_grad(per_task_losses)(params)
    updates, state = per_task_tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  key = jax.random.key(2)
  steps = {
    "plain summed-loss step": (summed_step(plain_loss), adam.init(params)),
    "fork step (activation level)": (summed_step(fork_loss), adam.init(params)),
    "per-task grads + graddrop step": (per_task_step, per_task_tx.init(params)),
  }
  fns = {
    label: (lambda s=step, st=state: s(params, st, key)) for label, (step, state) in steps.items()
  }
  times = _interleaved_medians(fns, repeats)
  base = times["plain summed-loss step"]
  return [
    {"tasks": num_tasks, "size": name, "method": label, "seconds": t, "ratio": t / base}
    for label, t in times.items()
  ]


def _temp_bytes(fn: Callable, *args: Any) -> int:
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return -1 if analysis is None else int(analysis.temp_size_in_bytes)


def _scaling_row(num_tasks: int, size: int, repeats: int) -> str:
  task_grads = jax.random.normal(jax.random.key(0), (num_tasks, size), jnp.float32)
  key = jax.random.key(1)
  floor = jax.jit(_plain_sum)
  drop = jax.jit(lambda g, k: ogd.graddrop(g, k))
  times = _interleaved_medians(
    {"floor": lambda: floor(task_grads), "graddrop": lambda: drop(task_grads, key)}, repeats
  )
  scratch = _temp_bytes(lambda g, k: ogd.graddrop(g, k), task_grads, key) / (4 * size)
  x = jax.random.normal(jax.random.key(3), (64, 32))
  steps = run_training_steps("scaling", _mlp([32, 128, 128], num_tasks), x, num_tasks, repeats)
  fork_ratio = next(r["ratio"] for r in steps if r["method"].startswith("fork"))
  return (
    f"| {num_tasks} | {1e3 * times['graddrop']:.2f} | {1e3 * times['graddrop'] / num_tasks:.3f} "
    f"| {times['graddrop'] / times['floor']:.2f}x | {scratch:.2f} | {fork_ratio:.2f}x |"
  )


def run_task_scaling(tasks: Sequence[int], size: int, repeats: int) -> str:
  """Time and scratch memory of graddrop and of a fork step as T grows."""
  lines = [
    "| T | graddrop ms | graddrop ms per task | ratio to floor | scratch / one task's bytes "
    "| fork step / plain step |",
    "|---:|---:|---:|---:|---:|---:|",
  ]
  lines += [_scaling_row(num_tasks, size, repeats) for num_tasks in tasks]
  return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    "| T | N | method | median ms | ratio |",
    "|---:|---:|---|---:|---:|",
  ]
  for r in rows:
    size = f"{r['size']:,}" if isinstance(r["size"], int) else r["size"]
    lines.append(
      f"| {r['tasks']} | {size} | {r['method']} | {1e3 * r['seconds']:.2f} | {r['ratio']:.2f}x |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small size, few repeats")
  parser.add_argument("--tasks", type=int, nargs="+", default=[8])
  parser.add_argument("--size", type=int, default=10_000_000, help="entries per task")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument(
    "--scaling-tasks",
    type=int,
    nargs="*",
    default=[2, 8, 40],
    help="T values for the scaling table",
  )
  args = parser.parse_args(argv)
  size, repeats = (100_000, 5) if args.quick else (args.size, args.repeats)
  rows = [row for t in args.tasks for row in run(t, size, repeats)]
  widths = [32, 64, 64] if args.quick else [512, 1024, 1024]
  batch = 16 if args.quick else 256
  mlp_name = f"MLP {'-'.join(map(str, widths))}, batch {batch}"
  models = {mlp_name: (_mlp(widths, 8), (batch, widths[0]))}
  if not args.quick:
    models["conv 2x(3x3, 32ch), 16x16, batch 64"] = (_conv(32, 8), (64, 16, 16, 3))
  for name, (model, x_shape) in models.items():
    x = jax.random.normal(jax.random.key(3), x_shape)
    rows += run_training_steps(name, model, x, 8, repeats)
    if name == mlp_name:
      rows += [
        {"tasks": 8, "size": name, "method": label, "seconds": t, "ratio": ratio}
        for label, ratio, t in _torchjd_training_steps(widths, batch, 8, repeats)
      ]
  table = markdown(rows)
  print(f"Machine: {_common.machine()}\n")
  print(table)
  if args.scaling_tasks:
    scaling_size = 10_000 if args.quick else 1_000_000
    print(
      f"\nScaling with the number of tasks (N = {scaling_size:,} per task; MLP 32-128-128, T heads):\n"
    )
    print(run_task_scaling(args.scaling_tasks, scaling_size, repeats))
  return table


if __name__ == "__main__":
  main()
