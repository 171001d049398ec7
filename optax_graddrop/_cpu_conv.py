"""Convolutions in the layout of XLA:CPU's fast kernel, inside loops too.

XLA:CPU runs a convolution with its Eigen kernel only when the input and the
output are NHWC and the kernel HWIO (1 to 3 spatial dimensions, float16 or
float32); any other gets a naive loop nest, 20-40x slower. Its
``ConvCanonicalization`` pass transposes other convolutions into that layout,
but it visits only the entry computation, not the body of a ``while`` loop.
JAX's backward pass of a convolution is two convolutions in other layouts
(the kernel gradient ``f01b_i01o->01bf``, the input gradient
``b01f_01oi->b01f``), so backward passes inside a loop, as in a loop over
tasks, ran naive convolutions: a conv net's 40 per-task backward passes took
25x as long in a ``fori_loop`` as unrolled.

:func:`canonical_convolutions` does that pass's rewrite in JAX, where it
reaches the convolutions of a loop body: the operands are transposed into
NHWC and HWIO and the result back.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core as jex_core

_CONV = jex_core.primitives.conv_general_dilated_p


def has_convolutions(fun: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fun(*args)`` computes a convolution (in any nested jaxpr)."""
  return _contains_conv(jax.make_jaxpr(fun)(*args).jaxpr)


def _contains_conv(jaxpr: Any) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive is _CONV:
      return True
    # Sub-jaxprs (jit, checkpoint, scan, cond branches) are parameters, bare
    # or closed, alone or in tuples.
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns") and _contains_conv(inner):
          return True
  return False


def canonical_convolutions(fun: Callable[..., Any]) -> Callable[..., Any]:
  """``fun`` with every convolution in NHWC/HWIO/NHWC layout.

  The result equals ``fun``'s to float rounding (the same products, summed
  by another kernel); only the layouts of the convolutions' operands change.
  Convolutions inside a nested ``jit`` or ``jax.checkpoint`` are rewritten
  too; those inside other higher-order primitives (``scan``, ``cond``,
  ``while_loop``) are left as they are, as XLA leaves them.

  Args:
    fun: a function of arrays (pytrees of them) returning a pytree of arrays.

  Returns:
    A function with ``fun``'s signature and results.
  """

  def rewritten(*args: Any) -> Any:
    closed, out_shapes = jax.make_jaxpr(fun, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shapes), outs)

  return rewritten


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """Evaluates ``jaxpr`` as ``jax.core.eval_jaxpr`` does, rewriting convolutions."""
  env: dict[Any, Any] = {}

  def read(var: Any) -> Any:
    return var.val if isinstance(var, jex_core.Literal) else env[var]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(var) for var in eqn.invars]
    with eqn.ctx.manager:
      if eqn.primitive is _CONV:
        outputs = [_canonical_conv(*inputs, **eqn.params)]
      elif eqn.primitive.name == "jit":
        inner = eqn.params["jaxpr"]
        outputs = _eval(inner.jaxpr, inner.consts, inputs)
      elif eqn.primitive.name == "remat2" and (
        (rewritten := _rewritten_jaxpr(eqn.params["jaxpr"], inputs)) is not None
      ):  # jax.checkpoint
        outputs = _bind(eqn, inputs, jaxpr=rewritten)
      else:
        outputs = _bind(eqn, inputs)
    env.update(zip(eqn.outvars, outputs))
  return [read(var) for var in jaxpr.outvars]


def _rewritten_jaxpr(jaxpr: Any, inputs: Sequence[Any]) -> Any:
  """``jaxpr`` with its convolutions rewritten, or ``None`` where that needs
  constants (from a ``jit`` inlined into it), which ``jaxpr`` cannot hold."""
  closed = jax.make_jaxpr(lambda *args: _eval(jaxpr, (), args))(*inputs)
  return None if closed.consts else closed.jaxpr


def _bind(eqn: Any, inputs: Sequence[Any], **replaced: Any) -> list[Any]:
  # As `jax.core.eval_jaxpr` binds: `get_bind_params` gave `(subfuns, params)`
  # in older jax versions and gives `params` in newer ones.
  bind_params = eqn.primitive.get_bind_params({**eqn.params, **replaced})
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  outputs = eqn.primitive.bind(*subfuns, *inputs, **params)
  return list(outputs) if eqn.primitive.multiple_results else [outputs]


def _canonical_conv(lhs: Any, rhs: Any, *, dimension_numbers: Any, **params: Any) -> Any:
  # ConvDimensionNumbers: (batch, feature, *spatial) positions of the input and
  # output, (out feature, in feature, *spatial) positions of the kernel.
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  ndim = len(lhs_spec)
  nhwc = (0, ndim - 1, *range(1, ndim - 1))
  hwio = (ndim - 1, ndim - 2, *range(ndim - 2))
  if (tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)) == (nhwc, hwio, nhwc):
    return _CONV.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  out_order = (out_spec[0], *out_spec[2:], out_spec[1])
  out = _CONV.bind(
    lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
    lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])),
    dimension_numbers=lax.ConvDimensionNumbers(nhwc, hwio, nhwc),
    **params,
  )
  return lax.transpose(out, tuple(out_order.index(dim) for dim in range(ndim)))
