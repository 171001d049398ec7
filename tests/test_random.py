"""Tests of the per-element 16-bit uniforms: one documented stream per pytree."""

import graddrop_oracle
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
  # (positions 4c .. 4c + 3), are uncorrelated.
  u = (bits + 0.5) / 2**16 - 0.5
  for lag in (1, 2, 3, 4, 5):
    corr = np.mean(u[:-lag] * u[lag:]) / np.var(u)
    assert abs(corr) < 6 / np.sqrt(n - lag), (lag, corr)
  low_bits = np.bincount(bits & 1, minlength=2)
  assert abs(low_bits[0] - n / 2) < 6 * np.sqrt(n / 4)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_bits_follow_the_documented_stream(impl):
  # The oracle computes the stream from JAX's threefry primitive (or
  # jax.random.bits) and the documented positions.
  key = jax.random.key(5, impl=impl)
  shapes = [(3, 5), (2,), (4, 4), (9,)]
  expected = graddrop_oracle.uniforms(key, shapes)
  offsets, _ = _random.call_offsets([int(np.prod(s)) for s in shapes])
  for shape, start, want in zip(shapes, offsets, expected):
    got = np.asarray(_random.uniform_bits(key, shape, start), np.float64) / 2**16
    np.testing.assert_array_equal(got, want)


def test_threefry_expression_equals_jax_primitive():
  from jax.extend.random import threefry2x32_p

  counts = jax.random.bits(jax.random.key(1), (2, 1000), jnp.uint32)
  key = jax.random.key_data(jax.random.key(7))
  ours = _random.threefry2x32((key[0], key[1]), (counts[0], counts[1]))
  theirs = threefry2x32_p.bind(jnp.full(1000, key[0]), jnp.full(1000, key[1]), counts[0], counts[1])
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit", [False, True])
def test_words_in_memory_and_inline_give_the_same_bits(jit):
  # The CPU schedule computes a stream's words once, in memory; GPU and TPU
  # leave them to be fused into each consumer. Both run here, on any backend.
  key = jax.random.key(8)
  segments = [[(0, 3)], [(3, 2), (9, 4)], [(5, 1)]]

  def bits(words_of):
    def run(key):
      words = words_of(key)
      return [
        _random.segment_bits(words, calls, 4 * sum(c for _, c in calls)) for calls in segments
      ]

    return (jax.jit(run) if jit else run)(key)

  in_memory = bits(lambda k: _random.stream_words(k, 0, 13, materialize=True))
  inline = bits(lambda k: _random.stream_words(k, 0, 13, materialize=False))
  for a, b in zip(in_memory, inline):
    np.testing.assert_array_equal(a, b)


def test_adjacent_pieces_are_read_as_one_range():
  # Small leaves that follow each other in the stream share one range of the
  # words, with the same bits.
  key = jax.random.key(3)
  requested = []

  def words(pieces):
    requested.append(list(pieces))
    return _random.stream_words(key, 0, 16, materialize=False)(pieces)

  joined = _random.segment_bits(words, [(0, 3), (3, 2), (9, 4), (13, 1)], 40)
  assert requested == [[(0, 5), (9, 5)]]
  pieces = [_random.uniform_bits(key, (4 * count,), start) for start, count in [(0, 5), (9, 5)]]
  np.testing.assert_array_equal(joined, jnp.concatenate(pieces))


@pytest.mark.parametrize("materialize", [False, True])
@pytest.mark.parametrize("table_calls", [0, 2**16])
def test_pieces_read_by_table_or_by_slices_give_the_same_bits(
  monkeypatch, materialize, table_calls
):
  # A segment of scattered pieces reads its words through one table of call
  # indices (one XLA operation), or piece by piece beyond _MAX_TABLE_CALLS.
  monkeypatch.setattr(_random, "_MAX_TABLE_CALLS", table_calls)
  key = jax.random.key(4)
  calls = [(2, 3), (7, 1), (11, 6), (40, 2)]

  @jax.jit
  def bits(key):
    words = _random.stream_words(key, 2, 42, materialize=materialize)
    return _random.segment_bits(words, calls, 4 * 12 - 3)

  expected = jnp.concatenate(
    [_random.uniform_bits(key, (4 * count,), start) for start, count in calls]
  )[: 4 * 12 - 3]
  np.testing.assert_array_equal(bits(key), expected)


def test_graddrop_accepts_other_key_implementations():
  task_grads = jax.random.normal(jax.random.key(0), (3, 1000))
  out = ogd.graddrop(task_grads, jax.random.key(1, impl="rbg"))
  assert out.shape == (1000,)
  np.testing.assert_array_equal(
    out, jax.jit(ogd.graddrop)(task_grads, jax.random.key(1, impl="rbg"))
  )
