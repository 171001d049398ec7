"""Speed of GradDrop: against the floor, across task counts, against torchjd.

Every table is timed interleaved in one process (each method once per round,
medians over rounds) and gives ratios to a baseline timed in the same
process; the machine line names the CPU, as ratios differ between CPUs.

    python benchmarks/speed.py                      # everything, T = 8, N = 10M
    python benchmarks/speed.py --quick              # small sizes, seconds
    python benchmarks/speed.py --sections param     # one section (see --help)

Sections:

* ``aggregation``: every aggregator on a stacked float32 gradient ``[T, N]``
  against the floor, the fastest jitted plain sum of the same stack (the
  ``T`` slices added in one fused loop): ``graddrop`` and its options,
  ``graddrop_transform.update`` with its default options (stats on), the
  baselines, and torchjd's ``GradDrop`` on the same matrix when installed.
* ``tasks``: ``graddrop`` with 10.24M entries in all as ``T`` grows from 8
  to 1000: time per entry relative to ``T = 8``, and compile time.
* ``steps``: jitted training steps (gradient + Adam) of an MLP 512-1024-1024
  with 8 linear heads (batch 256) and a small conv trunk: the plain
  summed-loss step, ``fork`` (activation level) and per-task gradients +
  ``graddrop_transform`` (parameter level), as ratios to the plain step.
* ``param``: parameter-level GradDrop on that MLP at ``T`` = 2, 8, 32, 64
  heads: the stacked step (``per_task_value_and_grad`` +
  ``graddrop_transform`` + Adam), its parts timed apart, the streaming step
  (``graddrop_value_and_grad`` + Adam) at several chunk sizes and torchjd's
  ``mtl_backward`` + ``GradDrop`` step when installed; times, ratios to
  torchjd, and compiled scratch memory; plotted in
  ``results/param_level.png``.
* ``scaling``: ``graddrop`` with ``N = 1M`` entries per task and ``T`` = 2,
  8, 40: time per task, scratch memory, and the ``fork`` step of a small MLP.

torch and torchjd are optional (``pip install torch==2.13.0 torchjd``).
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

SECTIONS = ("aggregation", "tasks", "steps", "param", "scaling")


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


def _ratio_rows(times: dict[str, float], base: str, label: str) -> list[list[str]]:
  return [[label, name, f"{1e3 * t:.2f}", f"{t / times[base]:.2f}x"] for name, t in times.items()]


def _temp_mib(fn: Callable, *args: Any) -> float:
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def _torch():
  try:
    import torch
    from torchjd.aggregation import GradDrop
    from torchjd.autojac import jac_to_grad
    from torchjd.autojac import mtl_backward
  except ImportError:
    return None
  return torch, GradDrop, jac_to_grad, mtl_backward


# --- Aggregation --------------------------------------------------------------


def _plain_sum(task_grads: jax.Array) -> jax.Array:
  total = task_grads[0]
  for i in range(1, task_grads.shape[0]):
    total = total + task_grads[i]
  return total


def run_aggregation(num_tasks: int, size: int, repeats: int) -> str:
  """Every aggregator on a ``[num_tasks, size]`` float32 stack, against the floor."""
  task_grads = jax.random.normal(jax.random.key(0), (num_tasks, size), jnp.float32)
  key = jax.random.key(1)
  weights = jnp.linspace(0.5, 1.5, num_tasks)
  leak = jnp.linspace(0.0, 1.0, num_tasks)
  transform = ogd.graddrop_transform(0)
  state = transform.init(task_grads[0])

  def jitted(fn: Callable, *args: Any) -> Callable[[], Any]:
    compiled = jax.jit(fn)
    return lambda: compiled(*args)

  fns = {
    "plain sum (floor)": jitted(_plain_sum, task_grads),
    "sum over task axis (jnp.sum(axis=0))": jitted(lambda g: g.sum(0), task_grads),
    "graddrop": jitted(lambda g, k: ogd.graddrop(g, k), task_grads, key),
    "graddrop, return_stats": jitted(
      lambda g, k: ogd.graddrop(g, k, return_stats=True), task_grads, key
    ),
    "graddrop, preserve_norm": jitted(
      lambda g, k: ogd.graddrop(g, k, preserve_norm=True), task_grads, key
    ),
    "graddrop, per-task leak": jitted(lambda g, k: ogd.graddrop(g, k, leak=leak), task_grads, key),
    "graddrop_transform.update (defaults: stats on)": jitted(
      transform.update, task_grads, state, task_grads[0]
    ),
    "sum_tasks": jitted(ogd.sum_tasks, task_grads),
    "mean_tasks": jitted(ogd.mean_tasks, task_grads),
    "sum_tasks(weight_tasks(g, w)) (a weighted sum)": jitted(
      lambda g, w: ogd.sum_tasks(ogd.weight_tasks(g, w)), task_grads, weights
    ),
    "weight_tasks alone (writes the [T, N] stack)": jitted(ogd.weight_tasks, task_grads, weights),
    "pcgrad": jitted(ogd.pcgrad, task_grads, key),
    "mgda": jitted(ogd.mgda, task_grads),
  }
  times = _interleaved_medians(fns, repeats)
  rows = _ratio_rows(times, "plain sum (floor)", f"T = {num_tasks}, N = {size:,}")
  stats_cost = times["graddrop_transform.update (defaults: stats on)"] / times["graddrop"]
  rows.append(["", "graddrop_transform.update / graddrop", "", f"{stats_cost:.2f}x"])
  copy = _interleaved_medians({"copy": jitted(lambda g: g * 1.0, task_grads)}, repeats)["copy"]
  rows.append(
    [
      "",
      "weight_tasks alone / a copy of the stack (its own floor)",
      f"{1e3 * copy:.2f}",
      f"{times['weight_tasks alone (writes the [T, N] stack)'] / copy:.2f}x",
    ]
  )
  torch = _torch()
  if torch is not None:
    import numpy as np

    matrix = torch[0].from_numpy(np.array(task_grads))
    aggregator = torch[1]()
    torch_times = _interleaved_medians(
      {"torch sum": lambda: matrix.sum(0), "torchjd GradDrop": lambda: aggregator(matrix)},
      max(repeats // 3, 3),
    )
    rows.append(
      [
        "",
        "torchjd GradDrop / graddrop (absolute times)",
        f"{1e3 * torch_times['torchjd GradDrop']:.2f}",
        f"{torch_times['torchjd GradDrop'] / times['graddrop']:.2f}x",
      ]
    )
  return _common.markdown_table(["setting", "method", "median ms", "ratio"], rows)


# --- Many tasks -----------------------------------------------------------------


def run_many_tasks(tasks: Sequence[int], total: int, repeats: int) -> str:
  """``graddrop`` with ``total`` entries in all: time per entry and compile time."""
  key = jax.random.key(1)
  compiled, stacks, compile_seconds = {}, {}, {}
  for num_tasks in tasks:
    stacks[num_tasks] = jax.random.normal(jax.random.key(0), (num_tasks, total // num_tasks))
    for stats in (False, True):
      fn = jax.jit(lambda g, k, s=stats: ogd.graddrop(g, k, return_stats=s))
      start = time.perf_counter()
      compiled[num_tasks, stats] = fn.lower(stacks[num_tasks], key).compile()
      compile_seconds[num_tasks, stats] = time.perf_counter() - start
  times = _interleaved_medians(
    {name: (lambda c=c, g=stacks[name[0]]: c(g, key)) for name, c in compiled.items()}, repeats
  )
  rows = []
  for (num_tasks, stats), t in times.items():
    per_entry = t / (num_tasks * (total // num_tasks))
    first = times[tasks[0], stats] / (tasks[0] * (total // tasks[0]))
    rows.append(
      [
        str(num_tasks),
        "yes" if stats else "no",
        f"{1e3 * t:.2f}",
        f"{1e9 * per_entry:.3f}",
        f"{per_entry / first:.2f}x",
        f"{compile_seconds[num_tasks, stats]:.2f}",
      ]
    )
  header = ["T", "stats", "median ms", "ns per entry", f"per entry vs T = {tasks[0]}", "compile s"]
  return _common.markdown_table(header, rows)


# --- Models ---------------------------------------------------------------------


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


def _task_losses_of(heads_fn: Callable, y: jax.Array) -> Callable:
  def task_losses_of(branches: Sequence[jax.Array], heads: jax.Array) -> jax.Array:
    # Head i reads branch i, in both the plain and the fork step.
    preds = jnp.stack(
      [heads_fn(heads[:, i : i + 1], b)[:, 0] for i, b in enumerate(branches)], axis=1
    )
    return jnp.mean((preds - y) ** 2, axis=0)

  return task_losses_of


def _adam_step(grad_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  @jax.jit
  def step(params, state, key):
    grads = grad_fn(params, key)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run_training_steps(
  name: str, model: tuple[Any, Callable, Callable], x: jax.Array, num_tasks: int, repeats: int
) -> list[list[str]]:
  """Jitted Adam steps: the plain sum, fork, and per-task gradients + graddrop."""
  params, trunk_fn, heads_fn = model
  y = jax.random.normal(jax.random.key(1), (x.shape[0], num_tasks))
  task_losses_of = _task_losses_of(heads_fn, y)

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
  per_task_tx = optax.chain(ogd.graddrop_transform(0), optax.adam(1e-3))
  key = jax.random.key(2)
  steps = {
    "plain summed-loss step": (_adam_step(jax.grad(plain_loss), adam), adam.init(params)),
    "fork step (activation level)": (_adam_step(jax.grad(fork_loss), adam), adam.init(params)),
    "per-task grads + graddrop_transform step": (
      _adam_step(lambda p, k: ogd.per_task_value_and_grad(per_task_losses)(p)[1], per_task_tx),
      per_task_tx.init(params),
    ),
  }
  fns = {
    label: (lambda s=step, st=state: s(params, st, key)) for label, (step, state) in steps.items()
  }
  return _ratio_rows(_interleaved_medians(fns, repeats), "plain summed-loss step", name)


def run_steps(quick: bool, repeats: int) -> str:
  widths = [32, 64, 64] if quick else [512, 1024, 1024]
  batch = 16 if quick else 256
  models = {
    f"MLP {'-'.join(map(str, widths))}, batch {batch}": (_mlp(widths, 8), (batch, widths[0]))
  }
  if not quick:
    models["conv 2x(3x3, 32ch), 16x16, batch 64"] = (_conv(32, 8), (64, 16, 16, 3))
  rows = []
  for name, (model, x_shape) in models.items():
    x = jax.random.normal(jax.random.key(3), x_shape)
    rows += run_training_steps(name, model, x, 8, repeats)
  return _common.markdown_table(["model (T = 8)", "method", "median ms", "vs plain step"], rows)


# --- Parameter level --------------------------------------------------------------


def _torchjd_step(widths: Sequence[int], batch: int, num_tasks: int) -> Callable[[], Any] | None:
  """torchjd's mtl_backward + GradDrop + Adam step on the same MLP, or None."""
  torch_modules = _torch()
  if torch_modules is None:
    return None
  torch, graddrop_aggregator, jac_to_grad, mtl_backward = torch_modules
  torch.manual_seed(0)
  layers = []
  for m, n in itertools.pairwise(widths):
    layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
  trunk = torch.nn.Sequential(*layers)
  heads = torch.nn.ModuleList([torch.nn.Linear(widths[-1], 1) for _ in range(num_tasks)])
  optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
  x, y = torch.randn(batch, widths[0]), torch.randn(batch, num_tasks)
  aggregator = graddrop_aggregator()

  def step():
    optimizer.zero_grad()
    features = trunk(x)
    losses = [((h(features)[:, 0] - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
    mtl_backward(losses, features)
    jac_to_grad(list(trunk.parameters()), aggregator)
    optimizer.step()

  return step


def _param_level_row(
  widths: Sequence[int], batch: int, num_tasks: int, chunk_sizes: Sequence[int], repeats: int
) -> dict[str, tuple[float, float]]:
  """``{method: (median seconds, scratch MiB)}`` at one number of tasks."""
  params, trunk_fn, heads_fn = _mlp(widths, num_tasks)
  x = jax.random.normal(jax.random.key(3), (batch, widths[0]))
  y = jax.random.normal(jax.random.key(1), (batch, num_tasks))

  def task_losses(params):
    return jnp.mean((heads_fn(params["heads"], trunk_fn(params["trunk"], x)) - y) ** 2, axis=0)

  key = jax.random.key(2)
  stacked_tx = optax.chain(ogd.graddrop_transform(0), optax.adam(1e-3))
  adam = optax.adam(1e-3)

  def stacked_step(params, state, key):
    del key
    _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
    updates, state = stacked_tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  def streaming_step(chunk_size):
    def step(params, state, key):
      _, grads, stats = ogd.graddrop_value_and_grad(
        task_losses, key, chunk_size=chunk_size, return_stats=True
      )(params)
      updates, state = adam.update(grads, state, params)
      return optax.apply_updates(params, updates), state, stats

    return step

  def parts_grads(params):
    return ogd.per_task_value_and_grad(task_losses)(params)[1]

  def parts_update(task_grads, state, params):
    updates, state = stacked_tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  steps = {"stacked step": (stacked_step, (params, stacked_tx.init(params), key))}
  for chunk_size in (None, *chunk_sizes):
    if chunk_size is None or chunk_size < num_tasks:
      label = f"streaming step, chunk_size={chunk_size}"
      steps[label] = (streaming_step(chunk_size), (params, adam.init(params), key))
  task_grads = jax.jit(parts_grads)(params)
  parts = {
    "parts: per-task gradients": (parts_grads, (params,)),
    "parts: graddrop_transform + Adam": (
      parts_update,
      (task_grads, stacked_tx.init(params), params),
    ),
  }
  fns = {}
  for label, (fn, args) in (steps | parts).items():
    compiled = jax.jit(fn).lower(*args).compile()
    fns[label] = lambda c=compiled, a=args: c(*a)
  torchjd = _torchjd_step(widths, batch, num_tasks)
  if torchjd is not None:
    fns["torchjd step"] = torchjd
  times = _interleaved_medians(fns, repeats)
  memory = {label: _temp_mib(fn, *args) for label, (fn, args) in steps.items()}
  return {label: (t, memory.get(label, float("nan"))) for label, t in times.items()}


def run_param_level(quick: bool, repeats: int, out_dir: Any) -> str:
  widths = [32, 64, 64] if quick else [512, 1024, 1024]
  batch = 16 if quick else 256
  tasks = [2, 4] if quick else [2, 8, 32, 64]
  chunk_sizes = (1, 4)
  results = {
    num_tasks: _param_level_row(widths, batch, num_tasks, chunk_sizes, repeats)
    for num_tasks in tasks
  }
  rows = []
  for num_tasks, row in results.items():
    torchjd = row.get("torchjd step", (float("nan"),))[0]
    for label, (t, mib) in row.items():
      rows.append([str(num_tasks), label, f"{1e3 * t:.1f}", f"{t / torchjd:.2f}x", f"{mib:.1f}"])
    parts = row["parts: per-task gradients"][0] + row["parts: graddrop_transform + Adam"][0]
    fused = row["stacked step"][0] / parts
    rows.append([str(num_tasks), "stacked step / sum of its parts", "", f"{fused:.2f}x", ""])
  header = ["T", "method", "median ms", "vs torchjd step", "scratch MiB"]
  table = _common.markdown_table(header, rows)
  if out_dir is not None:
    _plot_param_level(results, widths, out_dir)
  return table


def _plot_param_level(results: dict[int, dict[str, tuple[float, float]]], widths, out_dir) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(results)
  labels = [label for label in results[tasks[-1]] if not label.startswith("parts")]
  figure, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(11, 4))
  for label in labels:
    points = [(t, results[t][label]) for t in tasks if label in results[t]]
    ax_time.plot([t for t, _ in points], [1e3 * v[0] for _, v in points], "o-", label=label)
    if label != "torchjd step":
      ax_memory.plot([t for t, _ in points], [v[1] for _, v in points], "o-", label=label)
  for ax, ylabel in ((ax_time, "step time (ms)"), (ax_memory, "compiled scratch memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of tasks T")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  ax_time.legend(fontsize=8)
  figure.suptitle(f"Parameter-level GradDrop, MLP {'-'.join(map(str, widths))} + T heads, Adam")
  _common.save_figure(figure, out_dir, "param_level")


# --- Scaling ------------------------------------------------------------------------


def _scaling_row(num_tasks: int, size: int, quick: bool, repeats: int) -> list[str]:
  task_grads = jax.random.normal(jax.random.key(0), (num_tasks, size), jnp.float32)
  key = jax.random.key(1)
  floor = jax.jit(_plain_sum)
  drop = jax.jit(lambda g, k: ogd.graddrop(g, k))
  times = _interleaved_medians(
    {"floor": lambda: floor(task_grads), "graddrop": lambda: drop(task_grads, key)}, repeats
  )
  scratch = _temp_mib(lambda g, k: ogd.graddrop(g, k), task_grads, key) * 2**20 / (4 * size)
  x = jax.random.normal(jax.random.key(3), (64, 32))
  widths = [32, 64, 64] if quick else [32, 128, 128]
  steps = run_training_steps("scaling", _mlp(widths, num_tasks), x, num_tasks, repeats)
  fork_ratio = next(r[3] for r in steps if r[1].startswith("fork"))
  return [
    str(num_tasks),
    f"{1e3 * times['graddrop']:.2f}",
    f"{1e3 * times['graddrop'] / num_tasks:.3f}",
    f"{times['graddrop'] / times['floor']:.2f}x",
    f"{scratch:.2f}",
    fork_ratio,
  ]


def run_scaling(tasks: Sequence[int], size: int, quick: bool, repeats: int) -> str:
  """Time and scratch memory of graddrop and of a fork step as T grows."""
  header = [
    "T",
    "graddrop ms",
    "ms per task",
    "vs floor",
    "scratch / one task's bytes",
    "fork step / plain step",
  ]
  rows = [_scaling_row(num_tasks, size, quick, repeats) for num_tasks in tasks]
  return _common.markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  parser.add_argument("--tasks", type=int, nargs="+", default=[8], help="T of the aggregation")
  parser.add_argument("--size", type=int, default=10_000_000, help="entries per task")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--out", default=None, help="results folder (default: results/ when full)")
  args = parser.parse_args(argv)
  repeats = 5 if args.quick else args.repeats
  out_dir = _common.output_dir(args)
  blocks = [f"Machine: {_common.machine()}"]
  if "aggregation" in args.sections:
    size = 100_000 if args.quick else args.size
    for num_tasks in args.tasks:
      blocks.append("## Aggregation\n\n" + run_aggregation(num_tasks, size, repeats))
  if "tasks" in args.sections:
    # Sizes divisible by 4, as most parameters': each threefry call then
    # serves four entries (other sizes spend one call per entry).
    total = 102_400 if args.quick else 10_240_000
    tasks = [8, 100] if args.quick else [8, 32, 100, 1000]
    blocks.append(
      f"## Many tasks ({total:,} entries in all)\n\n" + run_many_tasks(tasks, total, repeats)
    )
  if "steps" in args.sections:
    blocks.append("## Training steps\n\n" + run_steps(args.quick, repeats))
  if "param" in args.sections:
    blocks.append(
      "## Parameter level (stats on, Adam)\n\n"
      + run_param_level(args.quick, max(repeats // 2, 3), out_dir)
    )
  if "scaling" in args.sections:
    size = 10_000 if args.quick else 1_000_000
    tasks = [2, 8] if args.quick else [2, 8, 40]
    blocks.append(
      f"## Scaling (N = {size:,} per task)\n\n" + run_scaling(tasks, size, args.quick, repeats)
    )
  text = "\n\n".join(blocks)
  print(text)
  if out_dir is not None and not args.quick:
    _common.write_text(out_dir, f"speed_{jax.default_backend()}", text)
  return text


if __name__ == "__main__":
  main()
