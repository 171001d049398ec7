"""Compile time of a real model's training steps: an NNX transformer with task heads.

A parameter-level GradDrop step computes the per-task gradients and GradDrop
on every parameter leaf, so its program is larger than the plain summed-loss
step's; this measures how much longer it takes to build. The model is a
2-layer pre-norm transformer (width 128, 4 heads, vocabulary 1,000, 32
tokens, batch 16) with one linear head per task: 42 parameter leaves at
``T = 3``. For each step (Adam in all three):

* plain: ``jax.grad`` of the summed task losses;
* stacked: ``per_task_value_and_grad`` + ``graddrop_transform``;
* streaming: ``graddrop_value_and_grad``.

Each step is traced, lowered and compiled in a fresh Python process (JAX
caches compiled programs, and jax.numpy its helpers, within a process),
after a warm-up compilation of an unrelated program; the table gives the
median over ``--repeats`` processes and the ratio to the plain step::

  python benchmarks/compile_time.py            # T = 3 and 5, 3 processes each
  python benchmarks/compile_time.py --quick    # a small model, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_graddrop as ogd

STEPS = ("plain", "stacked", "streaming")
FULL = {"width": 128, "layers": 2, "vocabulary": 1000, "tokens": 32, "batch": 16}
QUICK = {"width": 32, "layers": 1, "vocabulary": 100, "tokens": 8, "batch": 4}


class _Block(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(4, width, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.norm1(x))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class _Transformer(nnx.Module):
  def __init__(self, num_tasks: int, size: dict[str, int], rngs: nnx.Rngs):
    width = size["width"]
    self.embed = nnx.Embed(size["vocabulary"], width, rngs=rngs)
    self.position = nnx.Param(jnp.zeros((size["tokens"], width)))
    self.blocks = nnx.List([_Block(width, rngs) for _ in range(size["layers"])])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(width, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[...]
    for block in self.blocks:
      x = block(x)
    x = self.norm(x).mean(axis=1)
    return jnp.concatenate([head(x) for head in self.heads], axis=-1)


def _step_and_args(step: str, num_tasks: int, size: dict[str, int]) -> tuple[Any, tuple, int]:
  """The step function, its arguments and the number of parameter leaves."""
  graphdef, params = nnx.split(_Transformer(num_tasks, size, nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(
    jax.random.key(1), (size["batch"], size["tokens"]), 0, size["vocabulary"]
  )
  targets = jax.random.normal(jax.random.key(2), (size["batch"], num_tasks))

  def task_losses(params: Any) -> jax.Array:
    return jnp.mean((nnx.merge(graphdef, params)(tokens) - targets) ** 2, axis=0)

  adam = optax.adam(1e-3)
  if step == "plain":
    tx = adam

    def grads(params: Any, key: jax.Array) -> Any:
      return jax.grad(lambda p: jnp.sum(task_losses(p)))(params)
  elif step == "stacked":
    tx = optax.chain(ogd.graddrop_transform(0), adam)

    def grads(params: Any, key: jax.Array) -> Any:
      return ogd.per_task_value_and_grad(task_losses)(params)[1]
  else:
    tx = adam

    def grads(params: Any, key: jax.Array) -> Any:
      return ogd.graddrop_value_and_grad(task_losses, key)(params)[1]

  def train_step(params: Any, state: Any, key: jax.Array) -> tuple[Any, Any]:
    updates, state = tx.update(grads(params, key), state, params)
    return optax.apply_updates(params, updates), state

  args = (params, tx.init(params), jax.random.key(3))
  return train_step, args, len(jax.tree.leaves(params))


def _measure(step: str, num_tasks: int, quick: bool) -> dict[str, float]:
  """Seconds to trace and lower, and to compile, one step (in this process)."""
  warm_up = jax.jit(lambda x: jnp.tanh(x) @ x)
  warm_up.lower(jnp.ones((8, 8))).compile()
  train_step, args, leaves = _step_and_args(step, num_tasks, QUICK if quick else FULL)
  start = time.perf_counter()
  lowered = jax.jit(train_step).lower(*args)
  traced = time.perf_counter()
  lowered.compile()
  return {"trace": traced - start, "compile": time.perf_counter() - traced, "leaves": leaves}


def _in_fresh_process(step: str, num_tasks: int, quick: bool) -> dict[str, float]:
  command = [sys.executable, __file__, "--child", step, "--tasks", str(num_tasks)]
  result = subprocess.run(
    command + (["--quick"] if quick else []), capture_output=True, text=True, check=True
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small model, one process per step")
  parser.add_argument("--tasks", type=int, nargs="+", default=None, help="T (default: 3 and 5)")
  parser.add_argument("--repeats", type=int, default=3, help="fresh processes per step")
  parser.add_argument("--out", default=None, help="results folder (default: results/ when full)")
  parser.add_argument("--child", choices=STEPS, default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  args = _parse(argv)
  if args.child is not None:
    print(json.dumps(_measure(args.child, args.tasks[0], args.quick)))
    return ""
  tasks = args.tasks or ([2] if args.quick else [3, 5])
  repeats = 1 if args.quick else args.repeats
  rows = []
  for num_tasks in tasks:
    runs = {
      step: [_in_fresh_process(step, num_tasks, args.quick) for _ in range(repeats)]
      for step in STEPS
    }
    totals = {
      step: statistics.median(r["trace"] + r["compile"] for r in runs[step]) for step in STEPS
    }
    for step in STEPS:
      rows.append(
        [
          step,
          str(num_tasks),
          str(int(runs[step][0]["leaves"])),
          f"{statistics.median(r['trace'] for r in runs[step]):.2f}",
          f"{statistics.median(r['compile'] for r in runs[step]):.2f}",
          f"{totals[step]:.2f}",
          f"{totals[step] / totals['plain']:.2f}x",
        ]
      )
  header = ["step", "T", "leaves", "trace + lower s", "compile s", "total s", "vs plain"]
  size = QUICK if args.quick else FULL
  text = (
    f"Machine: {_common.machine()}\n\n## Compile time, NNX transformer "
    f"(width {size['width']}, layers {size['layers']}; median of {repeats} fresh processes)\n\n"
    + _common.markdown_table(header, rows)
  )
  print(text)
  out_dir = _common.output_dir(args)
  if out_dir is not None:
    print(_common.write_text(out_dir, f"compile_{jax.default_backend()}", text))
  return text


if __name__ == "__main__":
  main()
