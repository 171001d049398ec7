"""Speed of GradDrop: against the floor, across task and leaf counts, against torchjd.

Every table is timed interleaved in one process (each method once per round,
medians over rounds) and gives ratios to a baseline timed in the same
process; the machine line names the CPU and the accelerator, as ratios differ
between them. torch runs on the device JAX runs on (cuda when JAX is on a
GPU), and every table with matrix products names their precision, the same
in JAX and torch.

    python benchmarks/speed.py                      # everything
    python benchmarks/speed.py --quick              # small sizes, seconds
    python benchmarks/speed.py --sections param     # one section (see --help)

Sections:

* ``aggregation``: every aggregator on a stacked float32 gradient ``[T, N]``
  against the floor, the fastest jitted plain sum of the same stack (the
  ``T`` slices added in one fused loop): ``graddrop`` and its options,
  ``graddrop_transform.update`` with its default options (stats on), the
  baselines, and torch's sum and torchjd's ``GradDrop`` on the same matrix
  when installed. "% of copy bandwidth" is each method's effective bandwidth,
  counting ``T + 1`` rows moved (``2 T`` for a copy and for ``weight_tasks``
  alone), as a share of a copy's (``g * 1.0`` over the stack).
* ``tasks``: ``graddrop``, ``pcgrad`` and ``mgda`` with 10.24M entries in all
  as ``T`` grows from 8 to 1000: time per entry relative to ``T = 8``, and
  compile time; then sizes per task that are not multiples of 4 or 16 (and
  10,000 against 10,240 at ``T = 1000``), per entry against an aligned size.
* ``steps``: jitted training steps (gradient + Adam) of an MLP with linear
  heads and of a small conv trunk: the plain summed-loss step, ``fork``
  (activation level) and per-task gradients + ``graddrop_transform``
  (parameter level), as ratios to the plain step.
* ``param``: parameter-level GradDrop on the MLP as ``T`` grows: the stacked
  step (``per_task_value_and_grad`` + ``graddrop_transform`` + Adam), its
  parts timed apart, the streaming step (``graddrop_value_and_grad`` + Adam)
  at several chunk sizes and torchjd's ``mtl_backward`` + ``GradDrop`` step
  when installed; times, ratios to torchjd, and compiled scratch memory;
  plotted in ``results/param_level.png``. Then a conv trunk with 40 binary
  tasks: every way to get the per-task gradients against ``T`` plain backward
  passes.
* ``leaves``: ``graddrop`` and ``graddrop_transform(0).update`` on 96 leaves
  of mixed shapes (``T = 8``) against one leaf of the same total size: trace,
  lowering and compile time, and run time.
* ``scaling``: ``graddrop`` with ``N = 1M`` entries per task and ``T`` = 2,
  8, 40: time per task, scratch memory, and the ``fork`` step of a small MLP.

The MLP of ``steps`` and ``param`` is ``--mlp small`` (512-1024-1024, batch
256; the default on CPU) or ``--mlp large`` (1024-4096-4096-4096, batch 1024,
``T`` = 8 and 32; the default on GPU and TPU). ``--precision`` picks the
matrix products' precision: ``float32`` (JAX ``highest``, torch TF32 off;
the default) and, on GPUs, also ``tf32`` (TF32 in both).

torch and torchjd are optional (``pip install torch==2.13.0 torchjd``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_graddrop as ogd

SECTIONS = ("aggregation", "tasks", "steps", "param", "leaves", "scaling")


class Mlp(NamedTuple):
  """An MLP of the step and parameter-level sections, and the tasks it runs with."""

  widths: tuple[int, ...]
  batch: int
  step_tasks: tuple[int, ...]
  param_tasks: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"MLP {'-'.join(map(str, self.widths))}, batch {self.batch}"


MLPS = {
  "small": Mlp((512, 1024, 1024), 256, (8,), (2, 8, 32, 64)),
  "large": Mlp((1024, 4096, 4096, 4096), 1024, (8, 32), (8, 32)),
}
QUICK_MLP = Mlp((32, 64, 64), 16, (8,), (2, 4))

# Matrix-product precision: JAX's, and whether torch may use TF32.
PRECISIONS = {
  "float32": ("highest", False, "full float32 (JAX `highest`, torch TF32 off)"),
  "tf32": ("tensorfloat32", True, "TF32 (JAX `tensorfloat32`, torch TF32 on)"),
}

# Issue 22's leaf mix: 16 blocks of these shapes, 96 leaves.
LEAF_SHAPES = ((256, 256), (256,), (256, 1024), (1024,), (1024, 256), (3,))


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


def _compiled(fn: Callable, *args: Any) -> tuple[Callable[[], Any], float]:
  """``fn`` jitted and compiled for ``args``: a call without arguments, and seconds to compile."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return (lambda: compiled(*args)), time.perf_counter() - start


# --- torch, on the device JAX runs on ------------------------------------------------


def _torch():
  try:
    import torch
    from torchjd.aggregation import GradDrop
    from torchjd.autojac import jac_to_grad
    from torchjd.autojac import mtl_backward
  except ImportError:
    return None
  return torch, GradDrop, jac_to_grad, mtl_backward


def _torch_device(torch: Any) -> str:
  """``cuda`` when JAX runs on a GPU (and torch sees one), else ``cpu``."""
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_timed(torch: Any, device: str, fn: Callable[[], Any]) -> Callable[[], Any]:
  """``fn`` waiting for the device, as ``block_until_ready`` does for JAX."""
  if device != "cuda":
    return fn

  def synchronized():
    out = fn()
    torch.cuda.synchronize()
    return out

  return synchronized


def _torch_line() -> str:
  modules = _torch()
  if modules is None:
    return "torch: not installed (no torch or torchjd rows)"
  torch = modules[0]
  device = _torch_device(torch)
  name = torch.cuda.get_device_name() if device == "cuda" else "the CPU"
  return f"torch {torch.__version__} on {device} ({name})"


@contextlib.contextmanager
def _precision(name: str) -> Iterator[None]:
  """Matrix products in ``name``'s precision, in JAX (when traced) and torch (when run)."""
  jax_precision, tf32, _ = PRECISIONS[name]
  modules = _torch()
  torch = None if modules is None else modules[0]
  saved = None if torch is None else torch.get_float32_matmul_precision()
  if torch is not None:
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
  try:
    with jax.default_matmul_precision(jax_precision):
      yield
  finally:
    if torch is not None:
      torch.set_float32_matmul_precision(saved)


# --- Aggregation --------------------------------------------------------------


def _plain_sum(task_grads: jax.Array) -> jax.Array:
  total = task_grads[0]
  for i in range(1, task_grads.shape[0]):
    total = total + task_grads[i]
  return total


FLOOR, COPY = "plain sum (floor)", "copy of the stack (g * 1.0)"
WEIGHT_ALONE = "weight_tasks alone (writes the [T, N] stack)"


def run_aggregation(num_tasks: int, size: int, repeats: int) -> str:
  """Every aggregator on a ``[num_tasks, size]`` float32 stack, against the floor."""
  task_grads = jax.random.normal(jax.random.key(0), (num_tasks, size), jnp.float32)
  key = jax.random.key(1)
  weights = jnp.linspace(0.5, 1.5, num_tasks)
  leak = jnp.linspace(0.0, 1.0, num_tasks)
  transform = ogd.graddrop_transform(0)
  state = transform.init(task_grads[0])

  def jitted(fn: Callable, *args: Any) -> Callable[[], Any]:
    return _compiled(fn, *args)[0]

  fns = {
    FLOOR: jitted(_plain_sum, task_grads),
    COPY: jitted(lambda g: g * 1.0, task_grads),
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
    WEIGHT_ALONE: jitted(ogd.weight_tasks, task_grads, weights),
    "pcgrad": jitted(ogd.pcgrad, task_grads, key),
    "mgda": jitted(ogd.mgda, task_grads),
  }
  times = _interleaved_medians(fns, repeats)
  torch_modules = _torch()
  if torch_modules is not None:
    torch, graddrop_aggregator = torch_modules[:2]
    device = _torch_device(torch)
    matrix = torch.as_tensor(np.array(task_grads), device=device)  # a writable copy
    aggregator = graddrop_aggregator()
    torch_fns = {
      f"torch: sum over tasks ({device}, timed apart)": lambda: matrix.sum(0),
      f"torchjd GradDrop ({device}, timed apart)": lambda: aggregator(matrix),
    }
    torch_fns = {name: _torch_timed(torch, device, fn) for name, fn in torch_fns.items()}
    times |= _interleaved_medians(torch_fns, max(repeats // 3, 3))
  label = f"T = {num_tasks}, N = {size:,}"
  copy_rate = 2 * num_tasks / times[COPY]
  rows = []
  for name, t in times.items():
    moved = 2 * num_tasks if name in (COPY, WEIGHT_ALONE) else num_tasks + 1
    bandwidth = 100 * moved / t / copy_rate
    rows.append([label, name, f"{1e3 * t:.2f}", f"{t / times[FLOOR]:.2f}x", f"{bandwidth:.3g}%"])
  stats_cost = times["graddrop_transform.update (defaults: stats on)"] / times["graddrop"]
  rows.append(["", "graddrop_transform.update / graddrop", "", f"{stats_cost:.2f}x", ""])
  header = ["setting", "method", "median ms", "vs floor", "% of copy bandwidth"]
  return _common.markdown_table(header, rows)


# --- Many tasks, unaligned sizes --------------------------------------------------

MANY_TASK_METHODS: dict[str, Callable[[jax.Array, jax.Array], Any]] = {
  "graddrop": lambda g, k: ogd.graddrop(g, k),
  "graddrop, return_stats": lambda g, k: ogd.graddrop(g, k, return_stats=True),
  "pcgrad": ogd.pcgrad,
  "mgda": lambda g, k: ogd.mgda(g),
}


def run_many_tasks(tasks: Sequence[int], total: int, repeats: int) -> str:
  """Every method with ``total`` entries in all: time per entry and compile time."""
  key = jax.random.key(1)
  fns, compile_seconds = {}, {}
  for num_tasks in tasks:
    stack = jax.random.normal(jax.random.key(0), (num_tasks, total // num_tasks))
    for name, method in MANY_TASK_METHODS.items():
      fns[num_tasks, name], compile_seconds[num_tasks, name] = _compiled(method, stack, key)
  times = _interleaved_medians(fns, repeats)
  rows = []
  for (num_tasks, name), t in times.items():
    per_entry = t / (num_tasks * (total // num_tasks))
    first = times[tasks[0], name] / (tasks[0] * (total // tasks[0]))
    rows.append(
      [
        str(num_tasks),
        name,
        f"{1e3 * t:.2f}",
        f"{1e9 * per_entry:.3f}",
        f"{per_entry / first:.2f}x",
        f"{compile_seconds[num_tasks, name]:.2f}",
      ]
    )
  header = ["T", "method", "median ms", "ns per entry", f"per entry vs T = {tasks[0]}", "compile s"]
  return _common.markdown_table(header, rows)


def run_unaligned(cases: Sequence[tuple[int, tuple[int, ...]]], repeats: int) -> str:
  """``graddrop`` on ``[T, *shape]`` stacks: time per entry against the first (aligned) case."""
  key = jax.random.key(1)
  fns, compile_seconds = {}, {}
  for num_tasks, shape in cases:
    stack = jax.random.normal(jax.random.key(0), (num_tasks, *shape))
    fns[num_tasks, shape], compile_seconds[num_tasks, shape] = _compiled(
      lambda g, k: ogd.graddrop(g, k), stack, key
    )
  times = _interleaved_medians(fns, repeats)
  per_entry = {case: t / (case[0] * math.prod(case[1])) for case, t in times.items()}
  reference = per_entry[cases[0]]
  rows = []
  for num_tasks, shape in cases:
    size = math.prod(shape)
    rows.append(
      [
        str(num_tasks),
        " x ".join(f"{n:,}" for n in shape),
        f"{size:,}",
        f"{size & -size:,}",  # the largest power of two dividing N
        f"{1e3 * times[num_tasks, shape]:.2f}",
        f"{1e9 * per_entry[num_tasks, shape]:.3f}",
        f"{per_entry[num_tasks, shape] / reference:.2f}x",
        f"{compile_seconds[num_tasks, shape]:.2f}",
      ]
    )
  header = [
    "T",
    "leaf shape",
    "N per task",
    "largest power of 2 dividing N",
    "median ms",
    "ns per entry",
    f"per entry vs T = {cases[0][0]}, N = {math.prod(cases[0][1]):,}",
    "compile s",
  ]
  return _common.markdown_table(header, rows)


# --- Leaf count --------------------------------------------------------------------


def _timed_stages(fn: Callable, *args: Any) -> tuple[Callable[[], Any], dict[str, float]]:
  """``fn`` jitted for ``args``, with the seconds spent tracing, lowering and compiling."""
  seconds = {}
  start = time.perf_counter()
  traced = jax.jit(fn).trace(*args)
  seconds["trace"] = time.perf_counter() - start
  lowered = traced.lower()
  seconds["lower"] = time.perf_counter() - start - seconds["trace"]
  compiled = lowered.compile()
  seconds["compile"] = time.perf_counter() - start - seconds["trace"] - seconds["lower"]
  return (lambda: compiled(*args)), seconds


def run_leaves(shapes: Sequence[tuple[int, ...]], num_tasks: int, repeats: int) -> str:
  """``graddrop`` and the transform on many leaves against one leaf of the same size."""
  keys = jax.random.split(jax.random.key(0), len(shapes))
  many = {
    f"leaf{i:03d}": jax.random.normal(k, (num_tasks, *shape))
    for i, (k, shape) in enumerate(zip(keys, shapes))
  }
  total = sum(g[0].size for g in many.values())
  one = {"leaf": jax.random.normal(jax.random.key(1), (num_tasks, total))}
  key = jax.random.key(2)
  # The library's own first trace (its imports, jnp's caches) is not the leaves' cost.
  jax.block_until_ready(jax.jit(ogd.graddrop)(jnp.ones((2, 3)), key))
  fns, stages = {}, {}
  for layout, task_grads in ((f"{len(shapes)} leaves", many), ("1 leaf", one)):
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), task_grads)
    transform = ogd.graddrop_transform(0)
    methods = {
      "graddrop": (lambda g, k: ogd.graddrop(g, k), (task_grads, key)),
      "graddrop_transform(0).update": (
        transform.update,
        (task_grads, transform.init(params), params),
      ),
    }
    for name, (fn, args) in methods.items():
      fns[name, layout], stages[name, layout] = _timed_stages(fn, *args)
  times = _interleaved_medians(fns, repeats)
  rows = []
  for name, layout in fns:
    seconds, reference = stages[name, layout], stages[name, "1 leaf"]
    rows.append(
      [
        name,
        layout,
        *(f"{seconds[stage]:.2f}" for stage in ("trace", "lower", "compile")),
        f"{sum(seconds.values()):.2f}",
        f"{sum(seconds.values()) / sum(reference.values()):.2f}x",
        f"{1e3 * times[name, layout]:.2f}",
        f"{times[name, layout] / times[name, '1 leaf']:.2f}x",
      ]
    )
  header = [
    "method",
    f"T = {num_tasks}, {total:,} entries per task",
    "trace s",
    "lower s",
    "compile s",
    "total s",
    "total vs 1 leaf",
    "run ms",
    "run vs 1 leaf",
  ]
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


def _conv(channels: Sequence[int], hidden: int, num_tasks: int) -> tuple[Any, Callable, Callable]:
  """Two 3x3 convs (NHWC, 3 input channels), global average pooling, a linear
  layer of ``hidden`` units, linear heads: (params, trunk_fn, heads_fn)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  c1, c2 = channels
  trunk = {
    "convs": [
      jax.random.normal(k1, (3, 3, 3, c1)) / jnp.sqrt(27),
      jax.random.normal(k2, (3, 3, c1, c2)) / jnp.sqrt(9 * c1),
    ],
    "linear": jax.random.normal(k3, (c2, hidden)) / jnp.sqrt(c2),
  }
  heads = jax.random.normal(k4, (hidden, num_tasks)) / jnp.sqrt(hidden)

  def trunk_fn(trunk, x):
    for w in trunk["convs"]:
      x = jax.nn.relu(
        jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
      )
    return jax.nn.relu(x.mean(axis=(1, 2)) @ trunk["linear"])

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


def run_steps(mlps: Sequence[Mlp], quick: bool, repeats: int) -> str:
  rows = []
  for mlp in mlps:
    x = jax.random.normal(jax.random.key(3), (mlp.batch, mlp.widths[0]))
    for num_tasks in mlp.step_tasks:
      label = f"{mlp.name}, T = {num_tasks}"
      rows += run_training_steps(label, _mlp(mlp.widths, num_tasks), x, num_tasks, repeats)
  if not quick:
    x = jax.random.normal(jax.random.key(3), (64, 16, 16, 3))
    label = "conv 3x3 32-32ch + linear 64, 16x16, batch 64, T = 8"
    rows += run_training_steps(label, _conv((32, 32), 64, 8), x, 8, repeats)
  return _common.markdown_table(["model", "method", "median ms", "vs plain step"], rows)


# --- Parameter level --------------------------------------------------------------


def _torchjd_step(widths: Sequence[int], batch: int, num_tasks: int) -> Callable[[], Any] | None:
  """torchjd's mtl_backward + GradDrop + Adam step on the same MLP, or None."""
  torch_modules = _torch()
  if torch_modules is None:
    return None
  torch, graddrop_aggregator, jac_to_grad, mtl_backward = torch_modules
  device = _torch_device(torch)
  torch.manual_seed(0)
  layers = []
  for m, n in itertools.pairwise(widths):
    layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
  trunk = torch.nn.Sequential(*layers).to(device)
  heads = torch.nn.ModuleList([torch.nn.Linear(widths[-1], 1) for _ in range(num_tasks)])
  heads = heads.to(device)
  optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
  x = torch.randn(batch, widths[0], device=device)
  y = torch.randn(batch, num_tasks, device=device)
  aggregator = graddrop_aggregator()

  def step():
    optimizer.zero_grad()
    features = trunk(x)
    losses = [((h(features)[:, 0] - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
    mtl_backward(losses, features)
    jac_to_grad(list(trunk.parameters()), aggregator)
    optimizer.step()

  return _torch_timed(torch, device, step)


def _param_level_row(
  mlp: Mlp, num_tasks: int, chunk_sizes: Sequence[int], repeats: int
) -> dict[str, tuple[float, float]]:
  """``{method: (median seconds, scratch MiB)}`` at one number of tasks."""
  params, trunk_fn, heads_fn = _mlp(mlp.widths, num_tasks)
  x = jax.random.normal(jax.random.key(3), (mlp.batch, mlp.widths[0]))
  y = jax.random.normal(jax.random.key(1), (mlp.batch, num_tasks))

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
  fns = {label: _compiled(fn, *args)[0] for label, (fn, args) in (steps | parts).items()}
  torchjd = _torchjd_step(mlp.widths, mlp.batch, num_tasks)
  if torchjd is not None:
    fns["torchjd step"] = torchjd
  times = _interleaved_medians(fns, repeats)
  memory = {label: _temp_mib(fn, *args) for label, (fn, args) in steps.items()}
  return {label: (t, memory.get(label, float("nan"))) for label, t in times.items()}


def run_param_level(
  mlp: Mlp, repeats: int
) -> tuple[str, dict[int, dict[str, tuple[float, float]]]]:
  """The MLP's parameter-level steps at each of ``mlp.param_tasks``: a table, and
  ``{T: {method: (median seconds, scratch MiB)}}`` to plot."""
  results = {
    num_tasks: _param_level_row(mlp, num_tasks, (1, 4), repeats) for num_tasks in mlp.param_tasks
  }
  rows = []
  for num_tasks, row in results.items():
    torchjd = row.get("torchjd step", (None,))[0]
    for label, (t, mib) in row.items():
      versus = "-" if torchjd is None else f"{t / torchjd:.2f}x"
      memory = "-" if np.isnan(mib) else f"{mib:.1f}"
      rows.append([str(num_tasks), label, f"{1e3 * t:.1f}", versus, memory])
    parts = row["parts: per-task gradients"][0] + row["parts: graddrop_transform + Adam"][0]
    fused = row["stacked step"][0] / parts
    rows.append([str(num_tasks), "stacked step / sum of its parts", "", f"{fused:.2f}x", "-"])
  header = ["T", "method", "median ms", "vs torchjd step", "scratch MiB"]
  return _common.markdown_table(header, rows), results


def _plot_param_level(
  results: dict[int, dict[str, tuple[float, float]]], title: str, out_dir: Any, name: str
) -> None:
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
  figure.suptitle(title)
  _common.save_figure(figure, out_dir, name)


class ConvProblem(NamedTuple):
  """The conv model of the parameter-level comparison and its data."""

  channels: tuple[int, int]
  hidden: int
  image: int
  batch: int
  num_tasks: int
  chunk_sizes: tuple[int, ...]

  @property
  def name(self) -> str:
    c1, c2 = self.channels
    return (
      f"conv 3x3 {c1}-{c2}ch + linear {self.hidden}, {self.image}x{self.image}, "
      f"batch {self.batch}, {self.num_tasks} binary tasks"
    )


CONV = ConvProblem((16, 16), 64, 16, 64, 40, (1, 8))
QUICK_CONV = ConvProblem((4, 4), 8, 8, 8, 4, (1,))

BACKWARD_LOOP = "T plain backward passes (a Python loop of one jitted jax.grad)"


def run_conv_param_level(problem: ConvProblem, repeats: int) -> str:
  """Every way to get a conv net's per-task gradients, against T plain backward passes."""
  params, trunk_fn, heads_fn = _conv(problem.channels, problem.hidden, problem.num_tasks)
  x = jax.random.normal(jax.random.key(3), (problem.batch, problem.image, problem.image, 3))
  labels = jax.random.bernoulli(jax.random.key(1), 0.5, (problem.batch, problem.num_tasks))

  def task_losses(params):
    logits = heads_fn(params["heads"], trunk_fn(params["trunk"], x))
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean(0)

  key = jax.random.key(2)
  one_task = jax.jit(jax.grad(lambda p, i: task_losses(p)[i]))
  tasks = range(problem.num_tasks)
  jitted = {"jax.jacrev": jax.jacrev(task_losses)}
  for chunk_size in (None, *problem.chunk_sizes):
    jitted[f"per_task_value_and_grad, chunk_size={chunk_size}"] = ogd.per_task_value_and_grad(
      task_losses, chunk_size=chunk_size
    )
  for chunk_size in (None, *problem.chunk_sizes):
    jitted[f"graddrop_value_and_grad, chunk_size={chunk_size}"] = ogd.graddrop_value_and_grad(
      task_losses, key, chunk_size=chunk_size
    )
  fns = {BACKWARD_LOOP: lambda: [one_task(params, i) for i in tasks]}
  compile_seconds = {BACKWARD_LOOP: _compiled(one_task, params, 0)[1]}
  # The loop's memory is one backward pass's: the reference for the others.
  scratch = {BACKWARD_LOOP: _temp_mib(one_task, params, 0)}
  for label, fn in jitted.items():
    fns[label], compile_seconds[label] = _compiled(fn, params)
    scratch[label] = _temp_mib(fn, params)
  times = _interleaved_medians(fns, repeats)
  rows = [
    [
      label,
      f"{compile_seconds[label]:.2f}",
      f"{1e3 * t:.1f}",
      f"{t / times[BACKWARD_LOOP]:.2f}x",
      f"{scratch[label]:.1f}",
      f"{scratch[label] / scratch[BACKWARD_LOOP]:.2f}x",
    ]
    for label, t in times.items()
  ]
  header = [
    "method",
    "compile s",
    "median ms",
    "vs T backward passes",
    "scratch MiB",
    "vs one pass",
  ]
  return _common.markdown_table(header, rows)


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


# --- Command line -------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  on_accelerator = jax.default_backend() != "cpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  parser.add_argument("--tasks", type=int, nargs="+", default=[8], help="T of the aggregation")
  parser.add_argument(
    "--size",
    type=int,
    nargs="+",
    default=[10_000_000, 100_000_000] if on_accelerator else [10_000_000],
    help="entries per task of the aggregation (default: 10M, and 100M on GPU and TPU)",
  )
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument(
    "--mlp",
    nargs="+",
    choices=list(MLPS),
    default=["large"] if on_accelerator else ["small"],
    help="MLPs of the step and parameter-level sections (default: large on GPU and TPU)",
  )
  parser.add_argument(
    "--precision",
    nargs="+",
    choices=list(PRECISIONS),
    default=["float32", "tf32"] if jax.default_backend() == "gpu" else ["float32"],
    help="precisions of the matrix products (default: float32, and tf32 on GPUs)",
  )
  parser.add_argument(
    "--out", default=None, help="results folder (default: results/ for a full run of every section)"
  )
  return parser.parse_args(argv)


def _sections(args: argparse.Namespace, out_dir: Any) -> Iterator[str]:
  """The markdown blocks of the chosen sections, one at a time."""
  quick, repeats = args.quick, 5 if args.quick else args.repeats
  float32 = "float32 (JAX `highest`)"
  if "aggregation" in args.sections:
    with _precision("float32"):
      for size in [100_000] if quick else args.size:
        for num_tasks in args.tasks:
          yield "## Aggregation\n\n" + run_aggregation(num_tasks, size, repeats)
  if "tasks" in args.sections:
    # Sizes divisible by 4, as most parameters': each threefry call then
    # serves four entries. The second table shows what other sizes cost.
    total = 102_400 if quick else 10_240_000
    tasks = [8, 50] if quick else [8, 32, 100, 1000]
    with _precision("float32"):
      yield (
        f"## Many tasks ({total:,} entries in all; PCGrad's and MGDA's Gram matrices in {float32})\n\n"
        + run_many_tasks(tasks, total, repeats)
      )
      aligned, many = (12_800, 1_024) if quick else (1_280_000, 10_240)
      cases = [(8, (aligned + extra,)) for extra in ((0, 1) if quick else (0, 4, 2, 1))]
      # An odd size with two axes: the loop runs over rows (see backends.md).
      cases.append((8, (101, 127) if quick else (1_001, 1_279)))
      cases += [(tasks[-1], (many,)), (tasks[-1], (1_000 if quick else 10_000,))]
      yield "## Unaligned sizes\n\n" + run_unaligned(cases, repeats)
  mlps = [QUICK_MLP] if quick else [MLPS[name] for name in args.mlp]
  for precision in args.precision:
    described = PRECISIONS[precision][2]
    with _precision(precision):
      if "steps" in args.sections:
        yield f"## Training steps (matmuls in {described})\n\n" + run_steps(mlps, quick, repeats)
      if "param" in args.sections:
        for mlp in mlps:
          table, results = run_param_level(mlp, max(repeats // 2, 3))
          if out_dir is not None and precision == args.precision[0] and mlp == mlps[0]:
            backend = jax.default_backend()
            title = f"Parameter-level GradDrop, {mlp.name} + T heads, Adam ({backend})"
            name = "param_level" + ("" if backend == "cpu" else f"_{backend}")
            _plot_param_level(results, title, out_dir, name)
          yield f"## Parameter level, {mlp.name} (stats on, Adam; matmuls in {described})\n\n{table}"
      if "param" in args.sections and precision == args.precision[0]:
        conv = QUICK_CONV if quick else CONV
        yield (
          f"## Parameter level, {conv.name} (matmuls and convs in {described})\n\n"
          + run_conv_param_level(conv, max(repeats // 3, 3))
        )
  if "leaves" in args.sections:
    divisor, blocks = (16, 1) if quick else (1, 16)
    shapes = [tuple(max(d // divisor, 3) for d in shape) for shape in LEAF_SHAPES] * blocks
    yield "## Leaf count\n\n" + run_leaves(shapes, 8, repeats)
  if "scaling" in args.sections:
    size = 10_000 if quick else 1_000_000
    tasks = [2, 8] if quick else [2, 8, 40]
    with _precision("float32"):
      yield (
        f"## Scaling (N = {size:,} per task; the fork step's matmuls in {float32})\n\n"
        + run_scaling(tasks, size, quick, repeats)
      )


def main(argv: Sequence[str] | None = None) -> str:
  args = _parse(argv)
  # Only a run of every section replaces the committed results.
  full = set(args.sections) == set(SECTIONS) or args.out is not None
  out_dir = _common.output_dir(args) if full else None
  blocks = [f"Machine: {_common.machine()}; {_torch_line()}"]
  print(blocks[0], flush=True)
  for block in _sections(args, out_dir):
    # Each block as it comes, so that a run cut short keeps what it measured.
    print(f"\n{block}", flush=True)
    blocks.append(block)
    if out_dir is not None:
      _common.write_text(out_dir, f"speed_{jax.default_backend()}", "\n\n".join(blocks))
  return "\n\n".join(blocks)


if __name__ == "__main__":
  main()
