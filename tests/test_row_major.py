"""The row-major layout hint: asked for when compiling, dropped when exporting,
the identity under every transformation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_graddrop import _row_major


def _double(x):
  return 2.0 * _row_major.row_major(x)


def test_jit_asks_for_the_row_major_layout_and_export_does_not():
  x = jnp.ones((3, 4, 5))
  assert "LayoutConstraint" in jax.jit(_double).lower(x).as_text()
  exported = jax.export.export(jax.jit(_double), platforms=("cpu", "cuda"))(x)
  assert "LayoutConstraint" not in exported.mlir_module()
  np.testing.assert_array_equal(exported.call(x), 2.0 * x)


@pytest.mark.parametrize("jit", [False, True])
def test_the_hint_is_the_identity_under_transformations(jit):
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  maybe_jit = jax.jit if jit else lambda f: f
  chex.assert_trees_all_equal(maybe_jit(_double)(x), 2.0 * x)
  chex.assert_trees_all_equal(maybe_jit(jax.grad(lambda x: jnp.sum(_double(x) ** 2)))(x), 8.0 * x)
  _, tangent = maybe_jit(lambda x: jax.jvp(_double, (x,), (x,)))(x)
  chex.assert_trees_all_equal(tangent, 2.0 * x)
  for axis in range(3):
    batched = maybe_jit(jax.vmap(_double, in_axes=axis, out_axes=axis))(x)
    chex.assert_trees_all_equal(batched, 2.0 * x)
  chex.assert_trees_all_equal(maybe_jit(jax.checkpoint(_double))(x), 2.0 * x)


def test_a_concrete_array_is_returned_as_is():
  x = jnp.ones((2, 3))
  assert _row_major.row_major(x) is x
