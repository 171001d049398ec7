"""How a loop over tasks (or columns) is scheduled: chunks, in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def over_chunks(
  init: Any, num_tasks: int, chunk_size: int, add_chunk: Callable[[Any, Any, int, bool], Any]
) -> Any:
  """Folds ``add_chunk`` over the tasks, ``chunk_size`` at a time, in order.

  All chunks but the last run in a ``fori_loop``, so the compile time does
  not grow with ``T``; the last is left unevaluated, so that XLA fuses it
  with whatever reads the result.

  Args:
    init: the accumulator before the first task.
    num_tasks: ``T``.
    chunk_size: tasks per chunk, ``>= 1``.
    add_chunk: ``(acc, start, size, in_loop) -> acc`` adds tasks
      ``start..start+size-1``; ``start`` is traced when ``in_loop``.

  Returns:
    The accumulator after all tasks.
  """
  looped = (num_tasks - 1) // chunk_size
  acc = init
  if looped:
    acc = jax.lax.fori_loop(
      0, looped, lambda chunk, a: add_chunk(a, chunk * chunk_size, chunk_size, True), acc
    )
  start = looped * chunk_size
  return add_chunk(acc, start, num_tasks - start, False)
