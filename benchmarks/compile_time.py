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

A second table compares an 8-layer model written as a Python loop over its
blocks (13 leaves per block) with the same model scanned: its blocks built
under ``nnx.split_rngs`` + ``nnx.vmap`` and run with ``nnx.scan``, so each
kind of parameter is one ``[layers, ...]`` leaf whatever the depth.

Each step is traced, lowered and compiled in a fresh Python process (JAX
caches compiled programs, and jax.numpy its helpers, within a process),
after a warm-up compilation of an unrelated program; the tables give the
median over ``--repeats`` processes and the ratio to the plain step::

  python benchmarks/compile_time.py            # 3 processes per step
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
# The unrolled-against-scanned table: its depth, and its T.
DEEP = {"full": 8, "quick": 2}
DEEP_TASKS = 3


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


class _ScannedBlocks(nnx.Module):
  """``layers`` blocks with stacked parameters, run by ``nnx.scan``."""

  def __init__(self, width: int, layers: int, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> _Block:
      return _Block(width, rngs)

    self.stack = make(rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def apply(x: jax.Array, block: _Block) -> jax.Array:
      return block(x)

    return apply(x, self.stack)


class _Transformer(nnx.Module):
  def __init__(self, num_tasks: int, size: dict[str, int], scanned: bool, rngs: nnx.Rngs):
    width, layers = size["width"], size["layers"]
    self.embed = nnx.Embed(size["vocabulary"], width, rngs=rngs)
    self.position = nnx.Param(jnp.zeros((size["tokens"], width)))
    if scanned:
      self.blocks: nnx.Module = _ScannedBlocks(width, layers, rngs)
    else:
      self.blocks = nnx.Sequential(*(_Block(width, rngs) for _ in range(layers)))
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(width, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.blocks(self.embed(tokens) + self.position[...])
    x = self.norm(x).mean(axis=1)
    return jnp.concatenate([head(x) for head in self.heads], axis=-1)


def _step_and_args(
  step: str, num_tasks: int, size: dict[str, int], scanned: bool
) -> tuple[Any, tuple, int]:
  """The step function, its arguments and the number of parameter leaves."""
  model = _Transformer(num_tasks, size, scanned, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
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


def _measure(step: str, num_tasks: int, size: dict[str, int], scanned: bool) -> dict[str, float]:
  """Seconds to trace and lower, and to compile, one step (in this process)."""
  warm_up = jax.jit(lambda x: jnp.tanh(x) @ x)
  warm_up.lower(jnp.ones((8, 8))).compile()
  train_step, args, leaves = _step_and_args(step, num_tasks, size, scanned)
  start = time.perf_counter()
  lowered = jax.jit(train_step).lower(*args)
  traced = time.perf_counter()
  lowered.compile()
  return {"trace": traced - start, "compile": time.perf_counter() - traced, "leaves": leaves}


def _in_fresh_process(step: str, num_tasks: int, size: dict[str, int], scanned: bool) -> Any:
  command = [sys.executable, __file__, "--child", step, "--tasks", str(num_tasks)]
  command += ["--size", json.dumps(size)] + (["--scanned"] if scanned else [])
  result = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def _rows(label: str, num_tasks: int, size: dict[str, int], scanned: bool, repeats: int) -> list:
  """One row per step: medians over fresh processes, and the ratio to the plain step."""
  runs = {
    step: [_in_fresh_process(step, num_tasks, size, scanned) for _ in range(repeats)]
    for step in STEPS
  }
  totals = {
    step: statistics.median(r["trace"] + r["compile"] for r in runs[step]) for step in STEPS
  }
  return [
    [
      step,
      label,
      str(num_tasks),
      str(int(runs[step][0]["leaves"])),
      f"{statistics.median(r['trace'] for r in runs[step]):.2f}",
      f"{statistics.median(r['compile'] for r in runs[step]):.2f}",
      f"{totals[step]:.2f}",
      f"{totals[step] / totals['plain']:.2f}x",
    ]
    for step in STEPS
  ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small model, one process per step")
  parser.add_argument("--tasks", type=int, nargs="+", default=None, help="T (default: 3 and 5)")
  parser.add_argument("--repeats", type=int, default=3, help="fresh processes per step")
  parser.add_argument("--out", default=None, help="results folder (default: results/ when full)")
  parser.add_argument("--child", choices=STEPS, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--size", type=json.loads, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--scanned", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  args = _parse(argv)
  if args.child is not None:
    print(json.dumps(_measure(args.child, args.tasks[0], args.size, args.scanned)))
    return ""
  size = QUICK if args.quick else FULL
  tasks = args.tasks or ([2] if args.quick else [3, 5])
  repeats = 1 if args.quick else args.repeats
  header = ["step", "blocks", "T", "leaves", "trace + lower s", "compile s", "total s", "vs plain"]
  by_tasks = [row for t in tasks for row in _rows("loop", t, size, False, repeats)]
  deep = size | {"layers": DEEP["quick" if args.quick else "full"]}
  # A quick run checks that the scanned model compiles; the loop is above.
  layouts = ((("loop", False),) if not args.quick else ()) + (("scanned", True),)
  by_layout = [
    row for label, scanned in layouts for row in _rows(label, DEEP_TASKS, deep, scanned, repeats)
  ]
  text = (
    f"Machine: {_common.machine()}\n\n## Compile time, NNX transformer "
    f"(width {size['width']}, layers {size['layers']}; median of {repeats} fresh processes)\n\n"
    + _common.markdown_table(header, by_tasks)
    + f"\n\n## Blocks in a Python loop against scanned (layers {deep['layers']})\n\n"
    + _common.markdown_table(header, by_layout)
  )
  print(text)
  out_dir = _common.output_dir(args)
  if out_dir is not None:
    print(_common.write_text(out_dir, f"compile_{jax.default_backend()}", text))
  return text


if __name__ == "__main__":
  main()
