"""Every public function against every JAX transformation (issue 21).

Each row of ``ENTRIES`` is one public function, wrapped as ``fn(x, key)`` of
one float array ``x`` (stacked task gradients, or parameters); each test
below is one transformation, run on every row:

* ``jax.jit``: equals the untransformed call;
* ``jax.grad`` through ``fn`` (reverse mode), ``jax.jacfwd`` (forward mode,
  ``jax.jvp`` under ``vmap``), ``jax.grad`` through ``jax.checkpoint(fn)``:
  equal the Jacobian from central finite differences in float64;
* ``jax.vmap`` over data and over keys, ``lax.scan``: equal a Python loop;
* sharding over 8 CPU devices: equals one device (one subprocess for all
  rows, which also checks the masks of every kind of key);
* ``jax.export`` for CPU, GPU and TPU, serialized and run here: equals
  ``jax.jit``.

The rows of ``fork`` and the layers are the gradient of a loss through them
(their derivative is GradDrop's by design), so their ``jax.grad`` and
``jax.jacfwd`` cells are second derivatives; forward mode of a value computed
through them raises (``tests/test_limitations.py``). A new public function
joins the matrix with one line in ``ENTRIES``. Below the matrix: GradDrop's derivative
``d out / d g_i = l_i + (1 - l_i) M_i`` exactly, learning-rate meta-gradients
through two optimizer steps, and the statements of
``docs/guide/semantics.md`` and ``docs/guide/optax.md`` on key types, norm
preservation and where other transformations go.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax_compat
import numpy as np
import optax
import pytest
import tolerances
from flax import nnx
from jax.flatten_util import ravel_pytree
from test_sharding import _on_8_cpu_devices

import optax_graddrop as ogd

NUM_TASKS = 3
# Per-task leaks: GradDrop acts on tasks 0 and 2 in part, on task 1 fully.
LEAK = np.array([0.25, 0.0, 0.75], np.float32)
WEIGHTS = np.array([0.5, 1.0, 2.0], np.float32)
MASK = {"a": True, "b": False}
# Data of the functions of a model's parameters (fork, the layers, per-task gradients).
_data = np.random.default_rng(0)
FEATURES_IN = _data.normal(size=(5, 4)).astype(np.float32)
HEADS = _data.normal(size=(NUM_TASKS, 4)).astype(np.float32)
ACTIVATION = _data.normal(size=(4, 4)).astype(np.float32)


def _tasks(x: jax.Array) -> dict[str, jax.Array]:
  """Stacked task gradients ``[T, 16]`` as a pytree: a leaf whose size is a
  multiple of 4 (four uniforms per threefry call) and one whose size is not
  (the last column is added to it, so that every input counts)."""
  return {"a": x[:, :8].reshape(-1, 2, 4), "b": x[:, 8:15] + x[:, 15:]}


def _update(tx: optax.GradientTransformation, x: jax.Array, steps: int = 1) -> Any:
  """The updates of ``tx`` after ``steps`` updates (task gradients ``x``, ``x / 2``, ...)."""
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), _tasks(x))
  state = tx.init(params)
  for step in range(steps):
    updates, state = tx.update(_tasks(x / (step + 1)), state, params)
  return updates


def _like(constant: np.ndarray, x: jax.Array) -> jax.Array:
  """``constant`` in ``x``'s dtype: the finite differences run in float64."""
  return jnp.asarray(constant, x.dtype)


def _features(w: jax.Array) -> jax.Array:
  return jnp.tanh(jnp.matmul(_like(FEATURES_IN, w), w.reshape(4, 4), precision="highest"))


def _head_losses(branches: Any) -> jax.Array:
  """Task ``i``: a wave along ``HEADS[i]`` plus ``i`` times its branch's mean.

  The tasks' cotangents conflict, and so do their derivatives (the second
  derivatives ``-HEADS[i]**2 sin(...)`` differ in sign between tasks), so a
  gradient through ``fork`` differentiated again meets GradDrop's choices.
  """
  return jnp.stack(
    [
      jnp.mean(jnp.sin(2 * b * _like(HEADS[i], b))) + i * jnp.mean(b)
      for i, b in enumerate(branches)
    ]
  )


def _task_losses(w: jax.Array) -> jax.Array:
  return _head_losses((_features(w),) * NUM_TASKS)


def _fork_grad(split: Callable[[jax.Array, jax.Array], Any]) -> Callable[..., Any]:
  """``(w, key) -> jax.grad`` of the summed task losses, the trunk's
  activation split into the heads' branches by ``split(features, key)``."""
  return jax.grad(lambda w, key: jnp.sum(_head_losses(split(_features(w), key))))


def _gradnorm_weights(x: jax.Array) -> jax.Array:
  """GradNorm's weights after two updates (losses from ``x``, layer gradients ``x``)."""
  gn = ogd.gradnorm(NUM_TASKS)
  state = gn.init()
  for step in range(2):
    losses = jnp.sum(x**2, axis=1) / (step + 1)
    state = gn.update(state, losses, _tasks(x / (step + 1)))
  return state.weights


def _stacked(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def _floats(tree: Any) -> Any:
  return jax.tree.map(lambda m: m.astype(jnp.float32), tree)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One public function in the matrix.

  Attributes:
    name: the test id.
    fn: ``(x, key) -> pytree of float arrays``; ``key`` is ignored when not ``keyed``.
    shape: the shape of ``x`` (its last axis is sharded 8 ways).
    keyed: whether ``fn`` uses its key (then it is also vmapped over keys).
  """

  name: str
  fn: Callable[[jax.Array, jax.Array], Any]
  shape: tuple[int, ...] = (NUM_TASKS, 16)
  keyed: bool = True


# One line per public function (and per option that changes its code path).
ENTRIES = [
  Entry("graddrop", lambda x, k: ogd.graddrop(_tasks(x), k)),
  Entry("graddrop-options", lambda x, k: ogd.graddrop(_tasks(x), k, leak=LEAK, preserve_norm=True, return_stats=True, mask=MASK)),
  Entry("sign_masks", lambda x, k: _floats(ogd.sign_masks(_tasks(x), k))),
  Entry("sum_tasks", lambda x, k: ogd.sum_tasks(_tasks(x)), keyed=False),
  Entry("mean_tasks", lambda x, k: ogd.mean_tasks(_tasks(x)), keyed=False),
  Entry("weight_tasks", lambda x, k: ogd.weight_tasks(_tasks(x), _like(WEIGHTS, x)), keyed=False),
  Entry("pcgrad", lambda x, k: ogd.pcgrad(_tasks(x), k)),
  Entry("mgda", lambda x, k: ogd.mgda(_tasks(x)), keyed=False),
  Entry("graddrop_transform", lambda x, k: _update(ogd.graddrop_transform(k, leak=LEAK), x)),
  Entry("sum_transform", lambda x, k: _update(ogd.sum_transform(), x), keyed=False),
  Entry("mean_transform", lambda x, k: _update(ogd.mean_transform(), x), keyed=False),
  Entry("pcgrad_transform", lambda x, k: _update(ogd.pcgrad_transform(k, mask=MASK), x)),
  Entry("mgda_transform", lambda x, k: _update(ogd.mgda_transform(mask=MASK), x), keyed=False),
  Entry("multi_steps", lambda x, k: _update(ogd.multi_steps(optax.chain(ogd.graddrop_transform(k), optax.sgd(0.1)), 2, NUM_TASKS), x, 2)),
  Entry("graddrop_activation", lambda x, k: ogd.graddrop_activation(_like(ACTIVATION, x), list(x.reshape(-1, 4, 4)), k)),
  Entry("fork", _fork_grad(lambda f, k: ogd.fork(f, k, NUM_TASKS)), (16,)),
  Entry("nnx.GradDrop", _fork_grad(lambda f, k: ogd.nnx.GradDrop(NUM_TASKS, rngs=nnx.Rngs(graddrop=k))(f)), (16,)),
  Entry("linen.GradDrop", _fork_grad(lambda f, k: ogd.linen.GradDrop(NUM_TASKS).apply({}, f, rngs={"graddrop": k})), (16,)),
  Entry("graddrop_value_and_grad", lambda w, k: ogd.graddrop_value_and_grad(_task_losses, k, chunk_size=2, leak=LEAK)(w), (16,)),
  Entry("per_task_value_and_grad", lambda w, k: ogd.per_task_value_and_grad(_task_losses, chunk_size=2)(w), (16,), keyed=False),
  Entry("uncertainty_weighted_losses", lambda x, k: ogd.uncertainty_weighted_losses(x[0] ** 2, x[1]), (2, 8), keyed=False),
  Entry("gradnorm", lambda x, k: _gradnorm_weights(x), keyed=False),
]  # fmt: skip
IDS = [e.name for e in ENTRIES]
KEYED = [e for e in ENTRIES if e.keyed]


def _inputs(entry: Entry, index: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.fold_in(jax.random.key(10), index), entry.shape)


def _keys(count: int) -> jax.Array:
  return jax.random.split(jax.random.key(20), count)


def _flat(entry: Entry) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``fn`` with its outputs raveled into one vector."""
  return lambda x, key: ravel_pytree(entry.fn(x, key))[0]


def _terms(entry: Entry) -> int:
  """Bound on the values added into any output: every input."""
  return int(np.prod(entry.shape))


def _assert_close(actual: Any, expected: Any, entry: Entry) -> None:
  """Values that two orders of summation may round differently."""
  expected = jax.tree.map(lambda e, a: np.asarray(e, np.asarray(a).dtype), expected, actual)
  tolerances.assert_sums_close(actual, expected, _terms(entry))


def _assert_derivative_close(actual: jax.Array, expected: np.ndarray, entry: Entry) -> None:
  """A float32 derivative against float64 finite differences.

  Inputs and outputs are of order 1, so derivatives are compared to the
  rounding of a sum of order 1 at least (a derivative that is zero in exact
  arithmetic, e.g. through Adam's step, comes out at float32's noise).
  """
  actual = np.asarray(actual, np.float64)
  rtol = tolerances.summation_rtol(np.float32, _terms(entry))
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
  np.testing.assert_allclose(actual, expected.reshape(actual.shape), rtol=rtol, atol=rtol * scale)


@functools.cache
def _jitted(entry: Entry) -> Callable[[jax.Array, jax.Array], Any]:
  return jax.jit(entry.fn)


@functools.cache
def _fd_jacobian(entry: Entry) -> np.ndarray:
  """``d flat(fn) / dx`` at ``_inputs(entry)`` by central differences in float64.

  GradDrop's masks are piecewise constant: the differences see them held
  fixed unless a sign choice flips within ``h`` of these inputs (which would
  fail loudly, by a whole entry).
  """
  x = np.asarray(_inputs(entry), np.float64).reshape(-1)
  h = 1e-6
  with jax_compat.enable_x64():
    fn = jax.jit(lambda x: _flat(entry)(x.reshape(entry.shape), jax.random.key(0)))
    columns = []
    for j in range(x.size):
      step = np.zeros_like(x)
      step[j] = h
      columns.append((np.asarray(fn(x + step)) - np.asarray(fn(x - step))) / (2 * h))
  return np.stack(columns, axis=1)


def _cotangent(entry: Entry) -> np.ndarray:
  (size,) = jax.eval_shape(_flat(entry), _inputs(entry), jax.random.key(0)).shape
  return np.random.default_rng(1).normal(size=size).astype(np.float32)


def _projected(entry: Entry) -> Callable[[jax.Array], jax.Array]:
  """``x -> <w, flat(fn)(x, key)>`` for a fixed random ``w``."""
  w = _cotangent(entry)
  return lambda x: jnp.vdot(w, _flat(entry)(x, jax.random.key(0)))


def _value_and_reverse(entry: Entry) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """``x -> (flat(fn)(x, key), w^T d flat(fn) / dx)`` in one program."""
  w = _cotangent(entry)

  def value_and_reverse(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    value, vjp = jax.vjp(lambda x: _flat(entry)(x, jax.random.key(0)), x)
    return value, vjp(jnp.asarray(w))[0]

  return value_and_reverse


def _reverse_reference(entry: Entry) -> np.ndarray:
  return (_cotangent(entry) @ _fd_jacobian(entry)).reshape(entry.shape)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_jit_equals_the_untransformed_call(entry):
  x, key = _inputs(entry), jax.random.key(0)
  _assert_close(_jitted(entry)(x, key), entry.fn(x, key), entry)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_grad_through_the_function_equals_finite_differences(entry):
  grad = jax.jit(jax.grad(_projected(entry)))(_inputs(entry))
  _assert_derivative_close(grad, _reverse_reference(entry), entry)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_jacfwd_equals_finite_differences(entry):
  # jacfwd is jax.jvp mapped over a basis: forward mode, and vmap of it.
  jacfwd = jax.jit(jax.jacfwd(lambda x: _flat(entry)(x, jax.random.key(0))))
  _assert_derivative_close(jacfwd(_inputs(entry)), _fd_jacobian(entry), entry)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_grad_through_checkpoint_equals_finite_differences(entry):
  projected = _projected(dataclasses.replace(entry, fn=jax.checkpoint(entry.fn)))
  grad = jax.jit(jax.grad(projected))(_inputs(entry))
  _assert_derivative_close(grad, _reverse_reference(entry), entry)


def _loop(entry: Entry, xs: list[jax.Array], keys: list[jax.Array]) -> Any:
  return _stacked([_jitted(entry)(x, key) for x, key in zip(xs, keys)])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_vmap_over_data_equals_a_loop(entry):
  xs, key = [_inputs(entry, i) for i in range(2)], jax.random.key(0)
  batched = jax.jit(jax.vmap(entry.fn, in_axes=(0, None)))(jnp.stack(xs), key)
  _assert_close(batched, _loop(entry, xs, [key, key]), entry)


@pytest.mark.parametrize("entry", KEYED, ids=[e.name for e in KEYED])
def test_vmap_over_keys_equals_a_loop(entry):
  x, keys = _inputs(entry), _keys(2)
  batched = jax.jit(jax.vmap(entry.fn, in_axes=(None, 0)))(x, keys)
  _assert_close(batched, _loop(entry, [x, x], list(keys)), entry)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_scan_equals_a_loop(entry):
  xs, keys = [_inputs(entry, i) for i in range(2)], _keys(2)

  def scan(xs: jax.Array, keys: jax.Array) -> Any:
    return jax.lax.scan(lambda carry, xk: (carry, entry.fn(*xk)), None, (xs, keys))[1]

  _assert_close(jax.jit(scan)(jnp.stack(xs), keys), _loop(entry, xs, list(keys)), entry)


@functools.cache
def _register_export_serialization() -> None:
  """The namedtuples that ``jax.export`` serializes by name, as
  docs/guide/backends.md registers them (and optax's own states)."""
  for cls in (ogd.AggregatorState, ogd.GradDropStats):
    name = f"optax_graddrop.{cls.__name__}"
    jax.export.register_namedtuple_serialization(cls, serialized_name=name)
  for cls in (optax.EmptyState, optax.MultiStepsState):
    jax.export.register_namedtuple_serialization(cls, serialized_name=f"optax.{cls.__name__}")


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_export_for_every_platform_equals_jit(entry):
  # One program for CPU, GPU and TPU (the schedules are chosen inside it);
  # serialized, read back and run here, it equals the jitted function.
  _register_export_serialization()
  x, key = _inputs(entry), jax.random.key(0)
  exported = jax.export.export(_jitted(entry), platforms=("cpu", "cuda", "tpu"))(x, key)
  assert "LayoutConstraint" not in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  jax.tree.map(np.testing.assert_array_equal, restored.call(x, key), _jitted(entry)(x, key))


_IMPLS = ["threefry2x32", "rbg", "unsafe_rbg"]

# Run with 8 CPU devices: every entry's value and reverse-mode derivative
# with its input's last axis sharded 8 ways, and the masks of each key
# implementation on a sharded stack under Auto and Explicit mesh axes.
_SHARDED = """
import json, sys
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import test_transformations as m
import optax_graddrop as ogd

results = {}
mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
for entry in m.ENTRIES:
  sharding = NamedSharding(mesh, P(*([None] * (len(entry.shape) - 1)), "x"))
  try:
    with jax.set_mesh(mesh):
      value, grad = jax.jit(m._value_and_reverse(entry))(jax.device_put(m._inputs(entry), sharding))
    results[entry.name] = [np.asarray(value).tolist(), np.asarray(grad).tolist()]
  except Exception as error:
    results[entry.name] = f"{type(error).__name__}: {error}"
stack = jax.random.normal(jax.random.key(0), (3, 4, 16))
for impl in m._IMPLS:
  key = jax.random.key(3, impl=impl)
  expected = np.asarray(ogd.sign_masks(stack, key))
  for types in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(types,))
    with jax.set_mesh(mesh):
      sharded = jax.device_put(stack, NamedSharding(mesh, P(None, None, "x")))
      masks = jax.jit(ogd.sign_masks)(sharded, key)
    results[f"masks {impl} {types.name}"] = bool(np.array_equal(masks, expected))
print("RESULTS=" + json.dumps(results))
"""


def test_sharded_over_8_devices_equals_one_device():
  tests = str(pathlib.Path(__file__).resolve().parent)
  result = _on_8_cpu_devices(["-c", _SHARDED, tests])
  assert result.returncode == 0, result.stdout + result.stderr
  (line,) = [row for row in result.stdout.splitlines() if row.startswith("RESULTS=")]
  sharded = json.loads(line.removeprefix("RESULTS="))
  failures = [name for name, same in sharded.items() if name.startswith("masks ") and not same]
  for entry in ENTRIES:
    got = sharded[entry.name]
    if isinstance(got, str):
      failures.append(f"{entry.name}: {got}")
      continue
    value, grad = (np.asarray(g, np.float32) for g in got)
    expected = ravel_pytree(_jitted(entry)(_inputs(entry), jax.random.key(0)))[0]
    try:
      _assert_close(value, expected, entry)
      _assert_derivative_close(grad, _reverse_reference(entry), entry)
    except AssertionError as error:
      failures.append(f"{entry.name}: {error}")
  assert len(sharded) == len(ENTRIES) + 2 * len(_IMPLS)
  assert not failures, "\n".join(failures)


# GradDrop's derivative: the masks are piecewise constant, so with them held
# fixed d out / d g_i = l_i + (1 - l_i) M_i, elementwise.


def _leak_factors(task_grads: jax.Array, key: jax.Array, leak: Any) -> jax.Array:
  masks = ogd.sign_masks(task_grads, key).astype(jnp.float32)
  leak = jnp.broadcast_to(jnp.asarray(leak, jnp.float32), (task_grads.shape[0],))[:, None]
  return leak + (1 - leak) * masks


@pytest.mark.parametrize(
  ("jit", "leak"), [(True, 0.0), (True, LEAK), (False, LEAK)], ids=["jit", "jit-leak", "eager-leak"]
)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_graddrop_derivative_is_leak_plus_kept_masks(mode, jit, leak):
  task_grads = jax.random.normal(jax.random.key(0), (NUM_TASKS, 64))
  direction = jax.random.normal(jax.random.key(1), (NUM_TASKS, 64))
  key = jax.random.key(2)
  factors = _leak_factors(task_grads, key, leak)
  assert 0 < float(jnp.mean(factors)) < 1  # some entries dropped
  if mode == "reverse":
    cotangent = direction[0]

    def derivative(g):
      return jax.grad(lambda g: jnp.vdot(cotangent, ogd.graddrop(g, key, leak=leak)))(g)

    expected = factors * cotangent
  else:

    def derivative(g):
      return jax.jvp(lambda g: ogd.graddrop(g, key, leak=leak), (g,), (direction,))[1]

    expected = jnp.sum(factors * direction, axis=0)
  actual = (jax.jit(derivative) if jit else derivative)(task_grads)
  tolerances.assert_sums_close(actual, expected, NUM_TASKS)


def test_graddrop_derivative_at_zero_entries_of_agreeing_scalars_is_one():
  # Zero entries where no other task has the opposite sign: nothing is
  # picked, the output is the plain sum and its derivative is 1.
  task_grads = jnp.array([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
  key = jax.random.key(0)
  grad = jax.jit(jax.grad(lambda g: jnp.sum(ogd.graddrop(g, key, leak=LEAK))))(task_grads)
  np.testing.assert_array_equal(grad, np.ones_like(grad))
  np.testing.assert_array_equal(_leak_factors(task_grads, key, LEAK), np.ones_like(grad))


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_graddrop_derivative_at_zero_entries_of_conflicting_scalars_is_the_mean(mode):
  # A zero entry where the other tasks disagree in sign is a kink: its
  # one-sided derivatives are those of keeping it (l + (1 - l)) and of
  # dropping it (l). The documented derivative is their mean.
  task_grads = jnp.array([[0.0, 1.0], [2.0, -1.0], [-1.0, 0.0]])
  key = jax.random.key(0)
  leak = jnp.array([0.25, 0.0, 0.5])

  def out(g):
    return jnp.sum(ogd.graddrop(g, key, leak=leak))

  if mode == "reverse":
    grad = jax.jit(jax.grad(out))(task_grads)
  else:
    basis = jnp.eye(task_grads.size).reshape(-1, *task_grads.shape)
    grad = jax.vmap(lambda d: jax.jvp(out, (task_grads,), (d,))[1])(basis).reshape(task_grads.shape)
  zero = task_grads == 0
  expected = jnp.where(
    zero, leak[:, None] + (1 - leak[:, None]) / 2, _leak_factors(task_grads, key, leak)
  )
  np.testing.assert_array_equal(grad, expected)


# Learning-rate meta-gradients through two optimizer steps (issue 21: the
# aggregators' derivatives were silently zero on CPU, which gave -5.821
# instead of -4.579 on such a problem).

_META_X = np.random.default_rng(3).normal(size=(2, 6, 4)).astype(np.float32)
_META_Y = np.random.default_rng(4).normal(size=(2, 6)).astype(np.float32)
_META_LEAK = np.array([0.25, 0.0], np.float32)


def _meta_task_losses(w: jax.Array) -> jax.Array:
  predictions = jnp.einsum("tbi,i->tb", _META_X, w, precision="highest")
  return jnp.mean((predictions - _META_Y) ** 2, axis=1)


def _after_two_steps(lr: jax.Array, step: Callable[..., Any]) -> jax.Array:
  """Total task loss after two steps from ``w = 0.5``; ``step(w, state, lr)``."""
  w, state = jnp.full((4,), 0.5), None
  for _ in range(2):
    w, state = step(w, state, lr)
  return jnp.sum(_meta_task_losses(w))


def _chain_step(aggregator: Callable[[], optax.GradientTransformation]) -> Callable[..., Any]:
  def step(w, state, lr):
    tx = optax.chain(aggregator(), optax.sgd(lr))
    state = tx.init(w) if state is None else state
    _, task_grads = ogd.per_task_value_and_grad(_meta_task_losses)(w)
    updates, state = tx.update(task_grads, state, w)
    return optax.apply_updates(w, updates), state

  return step


def _plain_optax_step(w, state, lr):
  tx = optax.sgd(lr)
  state = tx.init(w) if state is None else state
  updates, state = tx.update(jax.grad(lambda w: jnp.sum(_meta_task_losses(w)))(w), state, w)
  return optax.apply_updates(w, updates), state


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_meta_gradient_through_sum_transform_equals_plain_optax(jit):
  lr = jnp.float32(0.3)
  meta = jax.grad(lambda lr: _after_two_steps(lr, _chain_step(ogd.sum_transform)))
  expected = jax.grad(lambda lr: _after_two_steps(lr, _plain_optax_step))(lr)
  assert abs(float(expected)) > 0.1
  np.testing.assert_allclose((jax.jit(meta) if jit else meta)(lr), expected, rtol=1e-4)


def test_meta_gradient_through_graddrop_transform_equals_fixed_masks():
  key, lr = jax.random.key(5), jnp.float32(0.3)

  def by_hand(w, state, lr):
    # The transform's key schedule: every update splits the key, uses the
    # second half and keeps the first.
    key = jax.random.key(5) if state is None else state
    key, step_key = jax.random.split(key)
    _, task_grads = ogd.per_task_value_and_grad(_meta_task_losses)(w)
    factors = _leak_factors(task_grads, step_key, _META_LEAK)  # bools: held fixed
    return w - lr * jnp.sum(factors * task_grads, axis=0), key

  step = _chain_step(lambda: ogd.graddrop_transform(key, leak=_META_LEAK))
  meta = jax.jit(jax.grad(lambda lr: _after_two_steps(lr, step)))(lr)
  expected = jax.jit(jax.grad(lambda lr: _after_two_steps(lr, by_hand)))(lr)
  np.testing.assert_allclose(meta, expected, rtol=1e-4)
  # Not the sum's: GradDrop dropped entries on the way.
  plain = jax.jit(jax.grad(lambda lr: _after_two_steps(lr, _plain_optax_step)))(lr)
  assert abs(float(meta) - float(plain)) > 1e-3 * abs(float(plain))


# Key types (docs/guide/semantics.md). Threefry keys give the same masks
# however the call is transformed. Other implementations draw through
# jax.random.bits and behave under vmap over keys as jax.random itself does
# ("rbg" and "unsafe_rbg" draw a whole batch from its first key). The sharded
# test above checks every kind of key on 8 devices.


def _equal_trees(a: Any, b: Any) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


@pytest.mark.parametrize("impl", _IMPLS)
def test_masks_under_vmap_over_keys_behave_as_jax_random(impl):
  task_grads = _tasks(_inputs(ENTRIES[0]))
  keys = jax.random.split(jax.random.key(3, impl=impl), 3)
  other_keys = jnp.concatenate([keys[:1], jax.random.split(jax.random.key(4, impl=impl), 2)])

  def vmapped(fn: Callable[[jax.Array], Any], keys: jax.Array) -> Any:
    return jax.jit(jax.vmap(fn))(keys)

  def masks(key: jax.Array) -> Any:
    return ogd.sign_masks(task_grads, key)

  def bits(key: jax.Array) -> jax.Array:
    return jax.random.bits(key, (64,), jnp.uint16)

  loop = _stacked([jax.jit(masks)(k) for k in keys])
  batched = vmapped(masks, keys)
  bits_loop = np.stack([jax.jit(bits)(k) for k in keys])
  assert _equal_trees(batched, loop) == np.array_equal(vmapped(bits, keys), bits_loop)
  same_first_key = np.array_equal(vmapped(bits, keys), vmapped(bits, other_keys))
  assert _equal_trees(batched, vmapped(masks, other_keys)) == same_first_key
  if impl == "threefry2x32":
    assert _equal_trees(batched, loop)
  # A loop traced once (lax.map without batch_size) is a loop for every kind.
  assert _equal_trees(jax.jit(lambda keys: jax.lax.map(masks, keys))(keys), loop)
  # Every batch element is a valid draw: a conflicting scalar keeps exactly
  # one sign (and zeros), an agreeing one every task.
  for b in range(len(keys)):
    for g, m in zip(jax.tree.leaves(task_grads), jax.tree.leaves(batched)):
      g, m = np.asarray(g), np.asarray(m)[b]
      conflict = (g > 0).any(0) & (g < 0).any(0)
      one_sign = (m == (g >= 0)).all(0) | (m == (g <= 0)).all(0)
      assert np.all(np.where(conflict, one_sign, m.all(0)))


@pytest.mark.parametrize("impl", _IMPLS)
def test_masks_are_the_same_with_jit_and_under_vmap_over_data(impl):
  xs = jnp.stack([_inputs(ENTRIES[0], i) for i in range(2)])
  key = jax.random.key(5, impl=impl)
  loop = [ogd.sign_masks(_tasks(x), key) for x in xs]
  assert all(_equal_trees(jax.jit(ogd.sign_masks)(_tasks(x), key), m) for x, m in zip(xs, loop))
  batched = jax.jit(jax.vmap(lambda x: ogd.sign_masks(_tasks(x), key)))(xs)
  assert _equal_trees(batched, _stacked(loop))


# preserve_norm beside lingvo's keep_gradnorm_constant (docs/guide/semantics.md).


def test_preserve_norm_rescales_to_the_plain_sums_norm_unlike_lingvos_first_formula():
  task_grads = jax.random.normal(jax.random.key(6), (NUM_TASKS, 256))
  key = jax.random.key(7)
  t = ogd.graddrop(task_grads, key)  # the GradDrop output
  o = ogd.sum_tasks(task_grads)  # the plain sum
  norm_t, norm_o = jnp.linalg.norm(t), jnp.linalg.norm(o)
  preserved = ogd.graddrop(task_grads, key, preserve_norm=True)
  tolerances.assert_sums_close(preserved, t * norm_o / norm_t, 256 + NUM_TASKS)
  norm_rtol = tolerances.summation_rtol(jnp.float32, 256 + NUM_TASKS)
  np.testing.assert_allclose(jnp.linalg.norm(preserved), norm_o, rtol=norm_rtol)
  # lingvo since February 2021 (commit ae4d22f): t ||o|| / (||t|| + 1e-7), the same.
  tolerances.assert_sums_close(preserved, t * norm_o / (norm_t + 1e-7), 256 + NUM_TASKS)
  # lingvo's first release (October 2020): t ||t|| / (||o|| + 1e-7), of norm ||t||^2 / ||o||.
  first = t * norm_t / (norm_o + 1e-7)
  assert abs(float(jnp.linalg.norm(first) - norm_o)) > 0.05 * float(norm_o)


# Where other transforms go relative to the aggregator (docs/guide/optax.md).


def _first_updates(transforms: list[Any], task_grads: Any, params: Any) -> Any:
  tx = optax.chain(*transforms)
  return tx.update(task_grads, tx.init(params), params)[0]


def _first_step_key(key: jax.Array) -> jax.Array:
  """The key of a transform's first update: it splits its key and uses the second half."""
  return jax.random.split(key)[1]


def test_weight_decay_before_the_aggregator_is_added_once_per_kept_task():
  params = jax.random.normal(jax.random.key(8), (64,))
  task_grads = jax.random.normal(jax.random.key(9), (NUM_TASKS, 64))
  decay, key = 0.1, jax.random.key(10)
  decayed_stack = task_grads + decay * params
  after = _first_updates(
    [ogd.sum_transform(), optax.add_decayed_weights(decay)], task_grads, params
  )
  before = _first_updates(
    [optax.add_decayed_weights(decay), ogd.sum_transform()], task_grads, params
  )
  tolerances.assert_sums_close(after, task_grads.sum(0) + decay * params, NUM_TASKS + 1)
  tolerances.assert_sums_close(
    before, task_grads.sum(0) + NUM_TASKS * decay * params, NUM_TASKS + 1
  )
  # Before GradDrop the decay is part of every task's entry: it counts once per
  # task whose sign is kept (0 to T times) and takes part in picking the sign.
  step_key = _first_step_key(key)
  before = _first_updates(
    [optax.add_decayed_weights(decay), ogd.graddrop_transform(key)], task_grads, params
  )
  tolerances.assert_sums_close(before, ogd.graddrop(decayed_stack, step_key), NUM_TASKS)
  kept = ogd.sign_masks(decayed_stack, step_key).sum(0)
  assert set(np.unique(kept).tolist()) >= {1, NUM_TASKS}
  after = _first_updates(
    [ogd.graddrop_transform(key), optax.add_decayed_weights(decay)], task_grads, params
  )
  tolerances.assert_sums_close(
    after, ogd.graddrop(task_grads, step_key) + decay * params, NUM_TASKS + 1
  )


def test_global_norm_clipping_before_the_aggregator_clips_the_stack_not_the_update():
  params = jnp.zeros(64)
  task_grads = jax.random.normal(jax.random.key(11), (NUM_TASKS, 64))
  key, max_norm = jax.random.key(12), 1.0
  after = _first_updates(
    [ogd.graddrop_transform(key), optax.clip_by_global_norm(max_norm)], task_grads, params
  )
  before = _first_updates(
    [optax.clip_by_global_norm(max_norm), ogd.graddrop_transform(key)], task_grads, params
  )
  # The global norm of the 64-entry update, before and after the scaling.
  rtol = tolerances.summation_rtol(jnp.float32, 2 * 64)
  np.testing.assert_allclose(optax.tree.norm(after), max_norm, rtol=rtol)
  # Before: the whole [T, ...] stack is scaled to norm 1 and GradDrop (scale
  # invariant) combines the scaled tasks: the same masks, and an update whose
  # norm the clipping does not bound (up to sqrt(T) for aligned tasks).
  scale = max_norm / jnp.linalg.norm(task_grads)
  step_key = _first_step_key(key)
  tolerances.assert_sums_close(before, scale * ogd.graddrop(task_grads, step_key), NUM_TASKS)
  assert float(optax.tree.norm(before)) > 1.1 * max_norm
