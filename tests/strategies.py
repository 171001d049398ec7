"""Hypothesis strategies shared by the tests: random GradDrop problems."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import graddrop_oracle
import jax
import jax.numpy as jnp
import numpy as np
import tolerances
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Leaks that are dyadic, so that sums of small integers weighted by them are exact.
DYADIC_LEAKS = (0.0, 0.25, 0.5, 1.0)


def _square(purity: Any) -> Any:
  return purity**2


class Problem(NamedTuple):
  """Stacked task gradients and GradDrop options."""

  task_grads: dict[str, np.ndarray]  # leaves [T, ...], float32 values in `dtype`'s range
  dtype: Any
  exact: bool  # small integers: every sum GradDrop forms is exact
  leak: Any
  keep: Any
  scale: float

  @property
  def num_tasks(self) -> int:
    return next(iter(self.task_grads.values())).shape[0]

  def as_dtype(self) -> dict[str, jnp.ndarray]:
    return {name: jnp.asarray(g, self.dtype) for name, g in self.task_grads.items()}

  def leaves(self) -> list[np.ndarray]:
    """The leaves as the library sees them (rounded to ``dtype``), in tree order."""
    return [np.asarray(g, np.float64) for g in _tree_leaves(self.as_dtype())]

  def options(self) -> dict[str, Any]:
    return {"leak": self.leak, "keep": self.keep, "scale": self.scale}


def _tree_leaves(tree: dict[str, Any]) -> list[Any]:
  return [tree[name] for name in sorted(tree)]


@st.composite
def problems(draw: Any, *, dtypes: tuple[Any, ...] = DTYPES, max_tasks: int = 6) -> Problem:
  """A pytree of 1-3 stacked leaves, a dtype, a leak and a keep function."""
  num_tasks = draw(st.integers(1, max_tasks))
  dtype = draw(st.sampled_from(dtypes))
  exact = draw(st.booleans())
  task_grads = {}
  for index in range(draw(st.integers(1, 3))):
    shape = (num_tasks, *draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=6)))
    if exact:
      values = draw(hnp.arrays(np.int8, shape, elements=st.integers(-4, 4))).astype(np.float32)
    else:
      values = draw(
        hnp.arrays(
          np.float32, shape, elements=st.floats(-10, 10, width=32).filter(lambda v: abs(v) > 1e-3)
        )
      )
    task_grads[f"leaf{index}"] = values
  leak = draw(
    st.one_of(
      st.sampled_from(DYADIC_LEAKS),
      st.lists(st.sampled_from(DYADIC_LEAKS), min_size=num_tasks, max_size=num_tasks),
    )
  )
  keep = draw(st.sampled_from(["linear", "sigmoid", "random", _square]))
  scale = draw(st.sampled_from([1.0, 0.5, 2.0])) if keep in ("linear", "sigmoid") else 1.0
  return Problem(task_grads, dtype, exact, leak, keep, scale)


def tolerance(problem: Problem) -> float:
  """Relative tolerance of an output against ``sum_i |g_i|``: 0 when exact."""
  if problem.exact:
    return 0.0
  return tolerances.summation_rtol(problem.dtype, problem.num_tasks)


def assert_matches_oracle(outputs: list[Any], expected: list[np.ndarray], problem: Problem) -> None:
  """Each output equals the oracle's, rounded to the dtype, within the tolerance."""
  for out, want, leaf in zip(outputs, expected, problem.leaves()):
    out = np.asarray(out, np.float64)
    want = np.asarray(jnp.asarray(want, problem.dtype), np.float64)
    if problem.exact:
      np.testing.assert_array_equal(out, want)
    else:
      bound = tolerance(problem) * np.abs(leaf).sum(0)
      assert np.all(np.abs(out - want) <= bound), np.max(np.abs(out - want) - bound)


def assert_graddrop_matches_oracle(out: Any, problem: Problem, key: jax.Array, stats: Any = None):
  """A GradDrop result (and its diagnostics) equals the oracle's for ``problem``."""
  expected = graddrop_oracle.graddrop(problem.leaves(), key, **problem.options())
  assert_matches_oracle(jax.tree.leaves(out), expected, problem)
  if stats is not None:
    options = {"keep": problem.keep, "scale": problem.scale}
    conflict_fraction, kept_fraction = graddrop_oracle.stats(problem.leaves(), key, **options)
    np.testing.assert_allclose(stats.conflict_fraction, conflict_fraction, rtol=1e-6)
    np.testing.assert_allclose(stats.kept_fraction, kept_fraction, rtol=1e-6)
