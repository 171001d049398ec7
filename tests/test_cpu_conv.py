"""Tests of canonical_convolutions: every convolution in NHWC/HWIO layout, same results."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest
import tolerances
from jax import lax

from optax_graddrop import _cpu_conv

# (input shape, kernel shape, dimension numbers, options)
_CONVS = {
  "NHWC": ((2, 7, 6, 3), (3, 2, 3, 4), ("NHWC", "HWIO", "NHWC"), {"window_strides": (2, 1)}),
  "NCHW dilated": (
    (2, 3, 7, 6),
    (4, 3, 3, 2),
    ("NCHW", "OIHW", "NCHW"),
    {"padding": ((1, 0), (2, 1)), "lhs_dilation": (2, 1), "rhs_dilation": (1, 2)},
  ),
  "1-D grouped": ((2, 9, 4), (3, 2, 6), ("NWC", "WIO", "NWC"), {"feature_group_count": 2}),
  "3-D batch groups": (
    (4, 3, 4, 5, 2),
    (3, 2, 2, 2, 4),
    ("NCDHW", "IDHWO", "NDHWC"),
    {"batch_group_count": 2},
  ),
}


def _conv(lhs, rhs, dimension_numbers, window_strides=None, padding="VALID", **options):
  window_strides = window_strides or (1,) * (lhs.ndim - 2)
  return lax.conv_general_dilated(
    lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers, **options
  )


def _operands(lhs_shape, rhs_shape):
  k1, k2 = jax.random.split(jax.random.key(0))
  return jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)


def _conv_specs(fun, *args):
  """The dimension numbers of every top-level convolution in ``fun``'s jaxpr."""
  jaxpr = jax.make_jaxpr(fun)(*args).jaxpr
  return [
    eqn.params["dimension_numbers"]
    for eqn in jaxpr.eqns
    if eqn.primitive.name == "conv_general_dilated"
  ]


def _canonical(spec):
  ndim = len(spec.lhs_spec)
  nhwc = (0, ndim - 1, *range(1, ndim - 1))
  return spec == lax.ConvDimensionNumbers(nhwc, (ndim - 1, ndim - 2, *range(ndim - 2)), nhwc)


@pytest.mark.parametrize("name", list(_CONVS))
def test_forward_and_backward_convolutions_match(name):
  lhs_shape, rhs_shape, dimension_numbers, options = _CONVS[name]
  lhs, rhs = _operands(lhs_shape, rhs_shape)
  conv = functools.partial(_conv, dimension_numbers=dimension_numbers, **options)
  out, vjp = jax.vjp(conv, lhs, rhs)
  cotangent = jax.random.normal(jax.random.key(1), out.shape)

  def forward_and_backward(lhs, rhs, cotangent):
    return conv(lhs, rhs), vjp(cotangent)

  rewritten = _cpu_conv.canonical_convolutions(forward_and_backward)
  got = jax.jit(rewritten)(lhs, rhs, cotangent)
  # Each output sums at most batch x window x features products.
  terms = lhs.size // lhs_shape[0] + out.size
  tolerances.assert_sums_close(got, forward_and_backward(lhs, rhs, cotangent), terms=terms)
  specs = _conv_specs(rewritten, lhs, rhs, cotangent)
  assert len(specs) == 3  # forward, input gradient, kernel gradient
  assert all(_canonical(spec) for spec in specs), specs
  assert not all(
    _canonical(spec) for spec in _conv_specs(forward_and_backward, lhs, rhs, cotangent)
  )


def test_under_vmap_and_grad():
  lhs_shape, rhs_shape, dimension_numbers, options = _CONVS["NCHW dilated"]
  lhs, rhs = _operands(lhs_shape, rhs_shape)

  def loss(lhs, rhs):
    return jnp.sum(jnp.tanh(_conv(lhs, rhs, dimension_numbers, **options)) ** 2)

  rewritten = _cpu_conv.canonical_convolutions(loss)
  terms = lhs.size
  tolerances.assert_sums_close(
    jax.grad(rewritten, argnums=(0, 1))(lhs, rhs), jax.grad(loss, argnums=(0, 1))(lhs, rhs), terms
  )
  batched = jnp.stack([rhs, -rhs, 2 * rhs])
  tolerances.assert_sums_close(
    jax.vmap(rewritten, in_axes=(None, 0))(lhs, batched),
    jax.vmap(loss, in_axes=(None, 0))(lhs, batched),
    terms,
  )


def _nested_conv_specs(jaxpr):
  """Dimension numbers of the convolutions in ``jaxpr`` and its ``jit`` and ``checkpoint`` calls."""
  specs = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      specs.append(eqn.params["dimension_numbers"])
    elif eqn.primitive.name in ("jit", "remat2"):
      inner = eqn.params["jaxpr"]
      specs += _nested_conv_specs(getattr(inner, "jaxpr", inner))
  return specs


def test_jit_and_checkpoint_are_rewritten_other_primitives_pass_through():
  lhs_shape, rhs_shape, dimension_numbers, options = _CONVS["NCHW dilated"]
  lhs, rhs = _operands(lhs_shape, rhs_shape)
  conv = functools.partial(_conv, dimension_numbers=dimension_numbers, **options)

  def loss(lhs, rhs):
    out = jax.nn.relu(jax.jit(conv)(lhs, rhs)) + jax.checkpoint(conv)(lhs, rhs)
    out = lax.cond(out.sum() > 0, jnp.sin, jnp.cos, out)
    total, _ = lax.scan(lambda c, row: (c + row.sum(), None), 0.0, out)
    with jax.named_scope("scaled"):
      return total

  grads = jax.grad(loss, argnums=(0, 1))
  rewritten = _cpu_conv.canonical_convolutions(grads)
  tolerances.assert_sums_close(jax.jit(rewritten)(lhs, rhs), grads(lhs, rhs), terms=lhs.size)
  before = _nested_conv_specs(jax.make_jaxpr(grads)(lhs, rhs).jaxpr)
  after = _nested_conv_specs(jax.make_jaxpr(rewritten)(lhs, rhs).jaxpr)
  # Forward and backward (input and kernel gradients) of both convolutions.
  assert len(before) == len(after) == 6
  assert not any(_canonical(spec) for spec in before)
  assert all(_canonical(spec) for spec in after)


def test_canonical_convolutions_are_left_alone():
  lhs_shape, rhs_shape, dimension_numbers, options = _CONVS["NHWC"]
  lhs, rhs = _operands(lhs_shape, rhs_shape)
  conv = functools.partial(_conv, dimension_numbers=dimension_numbers, **options)
  jaxpr = jax.make_jaxpr(_cpu_conv.canonical_convolutions(conv))(lhs, rhs).jaxpr
  assert [eqn.primitive.name for eqn in jaxpr.eqns] == ["conv_general_dilated"]
  chex.assert_trees_all_equal(_cpu_conv.canonical_convolutions(conv)(lhs, rhs), conv(lhs, rhs))


def test_checkpoint_with_constants_is_left_as_it_is():
  lhs_shape, rhs_shape, dimension_numbers, options = _CONVS["NCHW dilated"]
  lhs, rhs = _operands(lhs_shape, rhs_shape)
  # A jax array closed over by a jit becomes a constant of its jaxpr, which a
  # checkpoint's jaxpr cannot hold: that checkpoint keeps its convolutions.
  scales = jnp.arange(4.0)[:, None, None] * jnp.ones((4, 12, 7))

  def loss(lhs, rhs):
    scaled = jax.jit(lambda out: out * scales)
    return jax.checkpoint(lambda r: scaled(_conv(lhs, r, dimension_numbers, **options)))(rhs).sum()

  grads = jax.grad(loss, argnums=1)
  rewritten = _cpu_conv.canonical_convolutions(grads)
  tolerances.assert_sums_close(jax.jit(rewritten)(lhs, rhs), grads(lhs, rhs), terms=lhs.size)
  assert (
    _nested_conv_specs(jax.make_jaxpr(rewritten)(lhs, rhs).jaxpr)[-1]
    == (_nested_conv_specs(jax.make_jaxpr(grads)(lhs, rhs).jaxpr)[-1])
  )


def test_has_convolutions_looks_into_nested_jaxprs():
  x = jnp.ones((2, 3, 8, 8))
  w = jnp.ones((4, 3, 3, 3))

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME")

  def dense(x, w):
    return jnp.tanh(x.reshape(2, -1) @ jnp.ones((192, 5))) * w.sum()

  assert _cpu_conv.has_convolutions(conv, x, w)
  assert _cpu_conv.has_convolutions(jax.jit(jax.checkpoint(conv)), x, w)
  assert _cpu_conv.has_convolutions(lambda x, w: jax.grad(lambda w: conv(x, w).sum())(w), x, w)
  assert not _cpu_conv.has_convolutions(dense, x, w)
  assert not _cpu_conv.has_convolutions(lambda x, w: jax.grad(lambda w: dense(x, w).sum())(w), x, w)
