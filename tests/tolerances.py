"""Tolerances for comparing two orders of summation, from the dtype and the term count.

Two computations of the same sums (stacked against streamed, fused against
sliced, sharded against not, two matmul paths, one backend against another)
add the same values in different orders, so they agree only to rounding.
How much rounding depends on the dtype and on how many values were added,
never on the backend: XLA:CPU adds in one order, GPUs in tree-shaped ones.

Summing ``n`` values in floating point errs by at most ``(n - 1) u sum_i |x_i|``
to first order (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
ed., 2002, section 4.2), with ``u = eps / 2`` the unit roundoff of the dtype
the sums are formed in. Two orders therefore differ by at most
``(n - 1) eps sum_i |x_i|``, and by one more ``eps`` of the result's dtype
where each rounds its result to it. Nested sums (a matmul's contraction inside
a sum over tasks) add their lengths: the first-order errors add.

Tests compare against the largest entry of the expected leaf rather than
``sum_i |x_i|``, which is not at hand after a backward pass. ``SAFETY`` covers
that difference and the few roundings outside the sums (the products that form
each term, a final scaling). A wrong sign, a dropped term or a wrong mask moves
a result by a whole term, far beyond these tolerances; exact results (masks,
sums of small integers) are compared for equality, never with these.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAFETY = 4.0


def summation_rtol(dtype: Any, terms: int, *, accumulate: Any = None) -> float:
  """Relative tolerance between two orders of summing ``terms`` values.

  Args:
    dtype: dtype of the compared results.
    terms: number of values added into each result; for nested sums, the sum
      of their lengths (a batch of 32 through a width-16 layer, then 7 tasks:
      ``32 + 16 + 7``).
    accumulate: dtype the sums are formed in. Defaults to ``dtype`` promoted
      to at least float32, as the library and XLA form sums of 16-bit floats.

  Returns:
    ``SAFETY * (terms * eps(accumulate) + eps(dtype))``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tolerances import summation_rtol
    >>> f"{summation_rtol(jnp.float32, 7):.2e}"
    '3.81e-06'
    >>> summation_rtol(jnp.bfloat16, 7) > summation_rtol(jnp.float32, 7)  # rounds to bf16
    True
  """
  if terms < 1:
    raise ValueError(f"`terms` must be >= 1, got {terms}.")
  if accumulate is None:
    accumulate = jnp.promote_types(dtype, jnp.float32)
  eps_sum, eps_out = float(jnp.finfo(accumulate).eps), float(jnp.finfo(dtype).eps)
  return SAFETY * (terms * eps_sum + eps_out)


def assert_sums_close(actual: Any, expected: Any, terms: int, *, accumulate: Any = None) -> None:
  """Asserts two pytrees of sums agree to the rounding of ``terms`` additions.

  Each leaf must satisfy ``|actual - expected| <= rtol (|expected| + max|expected|)``
  with ``rtol = summation_rtol(dtype, terms, accumulate=accumulate)``, ``dtype``
  the less precise of the two leaves' (a float64 oracle is compared at the
  library's precision): relative to each entry, and absolutely to the leaf's
  largest entry for entries whose terms cancel.

  Args:
    actual: pytree of floating arrays.
    expected: pytree of the same structure and shapes.
    terms: as in ``summation_rtol``.
    accumulate: as in ``summation_rtol``.

  Raises:
    AssertionError: naming the leaf, if the structures, shapes or values differ.

  Example:
    >>> import numpy as np
    >>> from tolerances import assert_sums_close
    >>> x = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    >>> assert_sums_close({"s": x.sum(0)}, {"s": x[::-1].sum(0)}, terms=1000)
  """
  actual_leaves, actual_tree = jax.tree.flatten_with_path(actual)
  expected_leaves, expected_tree = jax.tree.flatten_with_path(expected)
  assert actual_tree == expected_tree, f"tree structures differ: {actual_tree} != {expected_tree}"
  for (path, got), (_, want) in zip(actual_leaves, expected_leaves):
    got, want = np.asarray(got), np.asarray(want)
    dtype = max(got.dtype, want.dtype, key=lambda d: jnp.finfo(d).eps)
    rtol = summation_rtol(dtype, terms, accumulate=accumulate)
    want64 = want.astype(np.float64)
    scale = float(np.max(np.abs(want64), initial=0.0, where=np.isfinite(want64)))
    np.testing.assert_allclose(
      got.astype(np.float64),
      want64,
      rtol=rtol,
      atol=rtol * scale,
      err_msg=f"leaf {jax.tree_util.keystr(path)}: sums of {terms} terms differ beyond rounding",
    )
