"""Speed of GradDrop against the floor: the fastest jitted plain sum.

Times, interleaved in one process, the jitted plain sum of a stacked float32
gradient of T tasks and N entries per task (summing the T slices, the
fastest form on XLA:CPU) and ``graddrop`` / ``graddrop_transform`` on the
same stack, and prints a markdown table of median times and ratios to the
floor, with the machine noted.

    python benchmarks/speed.py            # T = 8, N = 10M
    python benchmarks/speed.py --quick    # a small size, seconds
    python benchmarks/speed.py --tasks 2 8 40 --size 1000000

If ``torch`` and ``torchjd`` are installed, also times torchjd's GradDrop
aggregator on the same matrix (relative to torch's own plain sum).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import optax_graddrop as ogd


def _machine() -> str:
  device = jax.devices()[0]
  return (
    f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
    f"jax {jax.__version__} on {device.platform} ({device.device_kind})"
  )


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


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    "| T | N | method | median ms | ratio |",
    "|---:|---:|---|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['tasks']} | {r['size']:,} | {r['method']} | "
      f"{1e3 * r['seconds']:.2f} | {r['ratio']:.2f}x |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small size, few repeats")
  parser.add_argument("--tasks", type=int, nargs="+", default=[8])
  parser.add_argument("--size", type=int, default=10_000_000, help="entries per task")
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  size, repeats = (100_000, 5) if args.quick else (args.size, args.repeats)
  rows = [row for t in args.tasks for row in run(t, size, repeats)]
  table = markdown(rows)
  print(f"Machine: {_machine()}\n")
  print(table)
  return table


if __name__ == "__main__":
  main()
