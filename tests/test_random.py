"""Tests of the per-element 16-bit uniforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_graddrop as ogd
from optax_graddrop import _random


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4, 5), (0, 4)])
def test_bits_have_the_shape_and_range(impl, shape):
  key = jax.random.key(0, impl=impl)
  bits = _random.uniform_bits(key, shape)
  assert bits.shape == shape and bits.dtype == jnp.uint32
  assert jnp.all(bits < 2**16)
  np.testing.assert_array_equal(bits, jax.jit(_random.uniform_bits, static_argnums=1)(key, shape))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_bits_are_uniform_and_uncorrelated(impl):
  n = 1 << 18
  bits = np.asarray(_random.uniform_bits(jax.random.key(3, impl=impl), (n,)), np.int64)
  # Chi-square over 64 equal bins (63 dof): mean 63, sd ~11; 130 is > 6 sd.
  counts = np.bincount(bits >> 10, minlength=64)
  chi2 = np.sum((counts - n / 64) ** 2 / (n / 64))
  assert chi2 < 130, chi2
  # Neighbours, including the four halves drawn from one threefry call
  # (positions i and i + n/4, i + n/2, i + 3n/4), are uncorrelated.
  u = (bits + 0.5) / 2**16 - 0.5
  for lag in (1, n // 4, n // 2):
    corr = np.mean(u[:-lag] * u[lag:]) / np.var(u)
    assert abs(corr) < 6 / np.sqrt(n - lag), (lag, corr)
  low_bits = np.bincount(bits & 1, minlength=2)
  assert abs(low_bits[0] - n / 2) < 6 * np.sqrt(n / 4)


def test_leaf_keys_are_distinct_and_deterministic():
  keys = _random.leaf_keys(jax.random.key(1), 4)
  data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
  assert len(data) == 4
  again = _random.leaf_keys(jax.random.key(1), 4)
  for a, b in zip(keys, again):
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_graddrop_accepts_other_key_implementations():
  task_grads = jax.random.normal(jax.random.key(0), (3, 1000))
  out = ogd.graddrop(task_grads, jax.random.key(1, impl="rbg"))
  assert out.shape == (1000,)
  np.testing.assert_array_equal(
    out, jax.jit(ogd.graddrop)(task_grads, jax.random.key(1, impl="rbg"))
  )


@pytest.mark.parametrize("shape", [(8,), (4, 6), (2, 3, 4, 10)])
def test_materialized_bits_are_the_same_values(shape):
  key = jax.random.key(4)
  np.testing.assert_array_equal(
    _random.uniform_bits(key, shape), _random.uniform_bits(key, shape, materialize=True)
  )
