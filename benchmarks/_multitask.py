"""The training harness shared by the multitask classification benchmarks.

One small Flax NNX model (a conv trunk, then ``T`` linear heads), one Adam
setting, and the ways of combining the tasks that the benchmarks compare.
Every method trains the same initialisation on the same batches; only the
combination differs:

* ``sum``: ``jax.grad`` of the summed losses;
* ``GradDrop (act.)`` / ``random GradDrop (act.)``: ``fork`` on the trunk's
  output (the paper's form, one backward pass), ``keep="linear"`` /
  ``"random"``; with ``preserve_norm`` (lingvo's default) and with the
  sigmoid keep function;
* ``GradDrop (param.)``: per-task gradients of all parameters and
  ``graddrop_transform``; with ``preserve_norm`` and with the sigmoid;
* ``PCGrad`` / ``MGDA``: per-task gradients and ``pcgrad_transform`` /
  ``mgda_transform``;
* ``uncertainty``: Kendall et al.'s learned weights, then a plain sum;
* ``GradDrop + uncertainty``: the weighted losses through ``fork``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_graddrop as ogd
from optax_graddrop.problems import MultitaskData


class Method(NamedTuple):
  """How one benchmark method combines the task losses."""

  fork: dict[str, Any] | None = None  # GradDrop through `fork`, with these options
  graddrop: dict[str, Any] | None = None  # parameter-level GradDrop, with these options
  aggregator: Callable[[int], optax.GradientTransformation] | None = None  # other per-task methods
  uncertainty: bool = False

  def transform(self, seed: int) -> optax.GradientTransformation | None:
    """The aggregator on per-task gradients, or None for one backward pass."""
    if self.graddrop is not None:
      return ogd.graddrop_transform(seed, **self.graddrop)
    return None if self.aggregator is None else self.aggregator(seed)


# lingvo's defaults: the gradient's norm kept (`keep_gradnorm_constant=True`);
# it also offers a sigmoid keep function.
NORM = {"preserve_norm": True}
SIGMOID = {"keep": "sigmoid"}

METHODS: dict[str, Method] = {
  "sum": Method(),
  "GradDrop (act.)": Method(fork={}),
  "GradDrop (act.), preserve_norm": Method(fork=NORM),
  "GradDrop (act.), sigmoid": Method(fork=SIGMOID),
  "random GradDrop (act.)": Method(fork={"keep": "random"}),
  "GradDrop (param.)": Method(graddrop={}),
  "GradDrop (param.), preserve_norm": Method(graddrop=NORM),
  "GradDrop (param.), sigmoid": Method(graddrop=SIGMOID),
  "PCGrad": Method(aggregator=ogd.pcgrad_transform),
  "MGDA": Method(aggregator=lambda seed: ogd.mgda_transform()),
  "uncertainty": Method(uncertainty=True),
  "GradDrop + uncertainty": Method(fork={}, uncertainty=True),
}


class Hyperparameters(NamedTuple):
  """Shared by every method (tuned once, on ``sum``)."""

  learning_rate: float
  batch_size: int
  steps: int
  channels: int = 16
  hidden: int = 64


class Model(nnx.Module):
  """Two 3x3 convs (the second with stride 2), a dense layer, ``T`` heads."""

  def __init__(
    self, image_size: int, num_tasks: int, num_classes: int, hp: Hyperparameters, rngs: nnx.Rngs
  ):
    c = hp.channels
    self.conv1 = nnx.Conv(1, c, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c, 2 * c, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    flat = 2 * c * ((image_size + 1) // 2) ** 2
    self.dense = nnx.Linear(flat, hp.hidden, rngs=rngs)
    init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
    self.head_kernels = nnx.Param(init(rngs.params(), (num_tasks, hp.hidden, num_classes)))
    self.head_biases = nnx.Param(jnp.zeros((num_tasks, num_classes)))
    self.log_variances = nnx.Param(jnp.zeros((num_tasks,)))

  def features(self, images: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(images))
    x = nnx.relu(self.conv2(x))
    return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))

  def predict(self, images: jax.Array) -> jax.Array:
    """Logits ``[T, B, classes]`` of every head."""
    features = self.features(images)
    return self.heads(jnp.broadcast_to(features, (self.head_biases.shape[0], *features.shape)))

  def heads(self, branches: jax.Array) -> jax.Array:
    """``[T, B, hidden]`` -> logits ``[T, B, classes]``, head ``t`` on branch ``t``."""
    return jnp.einsum("tbh,thc->tbc", branches, self.head_kernels) + self.head_biases[:, None]


def _cross_entropies(model: Model, branches: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy per task over the labelled rows (a label of -1: none)."""
  logits = model.heads(branches)
  labelled = labels.T >= 0
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels.T, 0))
  return jnp.sum(jnp.where(labelled, losses, 0.0), axis=1) / jnp.maximum(labelled.sum(1), 1)


def task_losses(
  model: Model, images: jax.Array, labels: jax.Array, key: jax.Array | None, method: Method
) -> jax.Array:
  """The ``T`` losses to differentiate (weighted for uncertainty methods)."""
  return _losses_of_features(model, model.features(images), labels, key, method)


def _losses_of_features(
  model: Model, features: jax.Array, labels: jax.Array, key: jax.Array | None, method: Method
) -> jax.Array:
  """The heads' losses on the trunk's output; through ``fork`` unless ``key`` is None."""
  num_tasks = labels.shape[1]
  if method.fork is None or key is None:
    branches = jnp.broadcast_to(features, (num_tasks, *features.shape))
  else:
    branches = jnp.stack(ogd.fork(features, key, num_tasks, **method.fork))
  losses = _cross_entropies(model, branches, labels)
  if method.uncertainty:
    return ogd.uncertainty_weighted_losses(losses, model.log_variances)
  return losses


class Run(NamedTuple):
  """The outcome of training one method from one seed."""

  accuracy: np.ndarray  # test accuracy per task
  seconds_per_step: float  # median over chunks after compilation
  kept_fraction: float  # GradDrop's kept share of gradient entries at the end; NaN otherwise


def _kept_fraction(
  graphdef: Any, params: Any, images: jax.Array, labels: jax.Array, method: Method
) -> float:
  """The share of task-gradient entries GradDrop keeps, on one batch."""
  key = jax.random.key(0)
  if method.graddrop is not None:
    per_task = ogd.per_task_value_and_grad(
      lambda p: task_losses(nnx.merge(graphdef, p), images, labels, None, method)
    )

    def kept(params: Any) -> jax.Array:
      _, stats = ogd.graddrop(per_task(params)[1], key, return_stats=True, **method.graddrop)
      return stats.kept_fraction

  elif method.fork is not None:
    keep = {name: value for name, value in method.fork.items() if name in ("keep", "scale")}

    # What `fork`'s backward sees: per-task cotangents of the features,
    # marginalised over the batch with the features' sign.
    def kept(params: Any) -> jax.Array:
      model = nnx.merge(graphdef, params)
      features = model.features(images)
      cotangents = jax.jacrev(lambda f: _losses_of_features(model, f, labels, None, method))(
        features
      )
      signals = jnp.sum(jnp.sign(features) * cotangents, axis=1)
      return jnp.mean(ogd.sign_masks(signals, key, **keep))

  else:
    return float("nan")
  return float(jax.jit(kept)(params))


class Transfer(NamedTuple):
  """Transfer learning: the last task's labels are known on a few images only."""

  target_labelled: np.ndarray  # bool [N]
  target_batch: int  # labelled images added to every batch
  target_only: bool = False  # ignore the source tasks (the single-task baseline)


def _batch(
  key: jax.Array, images: jax.Array, labels: jax.Array, batch: int, transfer: Transfer | None
) -> tuple[jax.Array, jax.Array]:
  """A random batch; with ``transfer``, plus target-labelled images."""
  idx = jax.random.randint(key, (batch,), 0, images.shape[0])
  if transfer is None:
    return images[idx], labels[idx]
  labelled = jnp.asarray(np.flatnonzero(transfer.target_labelled))
  target_idx = labelled[
    jax.random.randint(jax.random.fold_in(key, 1), (transfer.target_batch,), 0, len(labelled))
  ]
  source_labels = labels[idx].at[:, -1].set(-1)  # their target labels are not known
  batch_labels = jnp.concatenate([source_labels, labels[target_idx]])
  if transfer.target_only:
    batch_labels = batch_labels.at[:, :-1].set(-1)
  return jnp.concatenate([images[idx], images[target_idx]]), batch_labels


def train(
  data: MultitaskData,
  method: Method,
  hp: Hyperparameters,
  seed: int,
  chunk: int = 50,
  transfer: Transfer | None = None,
) -> Run:
  """Trains ``method`` from ``seed``; returns test accuracies, speed, kept share."""
  num_tasks = data.train_labels.shape[1]
  model = Model(data.train_images.shape[1], num_tasks, data.num_classes, hp, nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  train_images, train_labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)

  def losses_fn(params: Any, images: jax.Array, labels: jax.Array, key: Any) -> jax.Array:
    return task_losses(nnx.merge(graphdef, params), images, labels, key, method)

  adam = optax.adam(hp.learning_rate)
  aggregator = method.transform(seed)
  if aggregator is None:
    tx = adam

    def updates_fn(params, opt_state, images, labels, key):
      grads = jax.grad(lambda p: losses_fn(p, images, labels, key).sum())(params)
      return tx.update(grads, opt_state, params)
  else:
    tx = optax.chain(aggregator, adam)
    per_task = ogd.per_task_value_and_grad(losses_fn)

    def updates_fn(params, opt_state, images, labels, key):
      _, task_grads = per_task(params, images, labels, key)
      return tx.update(task_grads, opt_state, params)

  @jax.jit
  def step(params, opt_state, step_index):
    step_key = jax.random.fold_in(jax.random.key(seed), step_index)
    batch_key, fork_key = jax.random.split(step_key)
    images, labels = _batch(batch_key, train_images, train_labels, hp.batch_size, transfer)
    updates, opt_state = updates_fn(params, opt_state, images, labels, fork_key)
    return optax.apply_updates(params, updates), opt_state

  # A Python loop over a jitted step: XLA:CPU runs convolutions inside a
  # `lax.scan` body several times slower than at the top level.
  opt_state = tx.init(params)
  times = []
  for start in range(0, hp.steps, chunk):
    stop = min(start + chunk, hp.steps)
    begin = time.perf_counter()
    for step_index in range(start, stop):
      params, opt_state = step(params, opt_state, step_index)
    jax.block_until_ready(params)
    times.append((time.perf_counter() - begin) / (stop - start))

  test_images, test_labels = jnp.asarray(data.test_images), jnp.asarray(data.test_labels)
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p).predict(x))(params, test_images)
  accuracy = np.asarray(jnp.mean(jnp.argmax(logits, -1) == test_labels.T, axis=1))
  kept = _kept_fraction(graphdef, params, train_images[:256], train_labels[:256], method)
  # The first chunk includes compilation.
  seconds = statistics.median(times[1:]) if len(times) > 1 else times[0]
  return Run(accuracy, seconds, kept)


def parse_args(
  doc: str, hp: Hyperparameters, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, Hyperparameters, int]:
  """The benchmark's options, its hyperparameters and number of seeds."""
  parser = _common.argument_parser(doc, hp.steps)
  parser.set_defaults(seeds=10)
  parser.add_argument(
    "--other-seeds", type=int, default=5, help="seeds for the methods other than sum and GradDrop"
  )
  parser.add_argument(
    "--tune", type=float, nargs="+", metavar="LR", help="sweep these learning rates on sum"
  )
  args = parser.parse_args(argv)
  hp = hp._replace(steps=args.steps)
  if args.quick:
    return args, hp._replace(steps=6, batch_size=16), 1
  return args, hp, args.seeds


def describe(data: MultitaskData, hp: Hyperparameters, tuning: str) -> str:
  """One line with the data sizes and the shared hyperparameters."""
  return (
    f"{len(data.train_images)} training / {len(data.test_images)} test images; "
    f"Adam lr {hp.learning_rate:g}, batch {hp.batch_size}, {hp.steps} steps; "
    f"conv trunk {hp.channels}-{2 * hp.channels} channels, dense {hp.hidden}; {tuning}."
  )


def run_all(
  data: MultitaskData,
  hp: Hyperparameters,
  seeds: int | dict[str, int],
  methods: dict[str, Method] = METHODS,
  progress: bool = True,
) -> dict[str, list[Run]]:
  """Trains every method from seeds ``0..n-1`` (``n`` per method when a dict)."""
  from tqdm import tqdm

  counts = seeds if isinstance(seeds, dict) else dict.fromkeys(methods, seeds)
  jobs = [(name, seed) for seed in range(max(counts.values())) for name in methods]
  jobs = [(name, seed) for name, seed in jobs if seed < counts[name]]
  runs: dict[str, list[Run]] = {name: [] for name in methods}
  for name, seed in tqdm(jobs, desc="training", disable=not progress):
    runs[name].append(train(data, methods[name], hp, seed))
  return runs


def seed_counts(args: argparse.Namespace, seeds: int, methods: dict[str, Method]) -> dict[str, int]:
  """``seeds`` for the sum and every GradDrop row (their paired differences
  need them), ``--other-seeds`` for the other methods."""
  other = seeds if args.quick else min(args.other_seeds, seeds)
  return {name: seeds if name == "sum" or "GradDrop" in name else other for name in methods}


def difference_to_sum(values: dict[str, np.ndarray], name: str) -> str:
  """Table cell: the paired difference to ``sum`` over their common seeds."""
  if name == "sum":
    return "-"
  common = min(len(values[name]), len(values["sum"]))
  return _common.paired_difference(values[name][:common], values["sum"][:common])


def validation_split(data: MultitaskData, fraction: float = 0.2) -> MultitaskData:
  """The training set split again: its last ``fraction`` becomes the test set."""
  cut = round(len(data.train_images) * (1 - fraction))
  return data._replace(
    train_images=data.train_images[:cut],
    train_labels=data.train_labels[:cut],
    test_images=data.train_images[cut:],
    test_labels=data.train_labels[cut:],
  )


def tune_learning_rate(
  data: MultitaskData, hp: Hyperparameters, learning_rates: Sequence[float], seeds: int = 2
) -> str:
  """Validation accuracy of ``sum`` for each learning rate, as a table.

  The validation set is the last fifth of the training set. For
  MultiDigits its pairs reuse the training pairs' source digits, so the
  accuracy is optimistic; it only ranks the learning rates.
  """
  val = validation_split(data)
  rows = []
  for lr in learning_rates:
    runs = run_all(val, hp._replace(learning_rate=lr), seeds, {"sum": METHODS["sum"]})
    accuracy = [run.accuracy.mean() for run in runs["sum"]]
    rows.append([f"{lr:g}", _common.mean_std(accuracy, 100)])
  return _common.markdown_table(["learning rate", "sum: validation accuracy (%)"], rows)


def speed_and_kept(runs: list[Run], sum_runs: list[Run]) -> list[str]:
  """Table cells: step time relative to ``sum`` and GradDrop's kept share."""
  ratio = statistics.median(r.seconds_per_step for r in runs) / statistics.median(
    r.seconds_per_step for r in sum_runs
  )
  kept = np.array([r.kept_fraction for r in runs])
  return [f"{ratio:.2f}x", "-" if np.isnan(kept).all() else f"{100 * kept.mean():.1f}"]


def bar_figure(values: dict[str, np.ndarray], ylabel: str, title: str) -> Any:
  """Mean +- std over seeds per method, with every seed as a dot."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 3.6))
  names = list(values)
  means = [np.mean(values[n]) for n in names]
  stds = [np.std(values[n]) for n in names]
  colors = ["0.6" if n == "sum" else ("C1" if "GradDrop" in n else "C0") for n in names]
  ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
  for i, name in enumerate(names):
    ax.plot(np.full(len(values[name]), i), values[name], "k.", markersize=3)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  spread = max(max(means) - min(means), max(stds), 1e-3)
  ax.set_ylim(min(means) - 3 * spread, max(means) + 3 * spread)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.tight_layout()
  return fig
