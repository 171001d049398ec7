"""The advice of docs/guide/limitations.md works as written."""

import jax
import jax.numpy as jnp
import pytest
import tolerances
from flax import nnx

import optax_graddrop as ogd


def _loss(w, key, **options):
  a, b = ogd.fork(jnp.tanh(w), key, 2, **options)
  return jnp.sum(a**2) - jnp.sum(b)


def test_forward_mode_through_fork_raises():
  w, key = jnp.ones(3), jax.random.key(0)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda w: _loss(w, key), (w,), (jnp.ones(3),))


def test_hessian_of_fork_equals_reverse_over_reverse():
  # Forward-over-reverse differentiates fork's backward rule, as
  # reverse-over-reverse does.
  w, v, key = jnp.linspace(-1.0, 1.0, 3), jnp.arange(3.0), jax.random.key(0)
  hessian = jax.hessian(_loss)(w, key)
  hvp = jax.grad(lambda w: jnp.vdot(jax.grad(_loss)(w, key), v))(w)
  tolerances.assert_sums_close(hessian @ v, hvp, terms=2 + 3)


def test_reverse_over_reverse_gives_hessian_vector_products():
  # With a leak of 1, fork's backward pass is the plain sum, so the HVP is
  # that of the plain loss, which forward mode can compute.
  w, v, key = jnp.linspace(-1.0, 1.0, 3), jnp.arange(3.0), jax.random.key(0)
  hvp = jax.grad(lambda w: jnp.vdot(jax.grad(_loss)(w, key, leak=1.0), v))(w)

  def plain(w):
    features = jnp.tanh(w)
    return jnp.sum(features**2) - jnp.sum(features)

  expected = jax.jvp(jax.grad(plain), (w,), (v,))[1]
  tolerances.assert_sums_close(hvp, expected, terms=2 + 3)  # the tasks, the vdot


def test_deterministic_layers_allow_forward_mode():
  layer = ogd.nnx.GradDrop(2, deterministic=True, rngs=nnx.Rngs(graddrop=0))
  x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

  def model(x):
    a, b = layer(x)
    return jnp.sum(a**2) - jnp.sum(b)

  _, tangent = jax.jvp(model, (x,), (jnp.ones_like(x),))
  tolerances.assert_sums_close(tangent, jnp.sum(2 * x - 1), terms=2 + x.size)
