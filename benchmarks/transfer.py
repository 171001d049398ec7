"""Transfer learning with a leak: a target task with few labels beside two source tasks.

The paper's setting for the leak (and the official implementation's advice):
train jointly on source tasks with plenty of labels and a target task with
few, give the target a leak of 1 (its gradient passes whole) and the sources
a leak of 0. Data (``optax_graddrop.problems.digit_transfer``, offline): the
MultiDigits images; the sources classify the two digits (10,000 labelled
images); the target asks whether the top-left digit has more ink than the
median digit, labelled on 50, 200 or 1,000 images (related to the sources,
not implied by them). Every batch has 128 source images and 32 target-labelled
ones. Methods, with the same model, initialisations, batches and
hyperparameters (MultiDigits', tuned once on the sum):

* ``target only``: the target's loss alone (the sources unused);
* ``sum``: the summed losses;
* ``GradDrop, leak 0`` and ``GradDrop, leak 1 on the target``: ``fork`` at the
  trunk's output, leaks ``(0, 0, 0)`` and ``(0, 0, 1)``;
* ``random GradDrop, leak 1 on the target``: the fair-coin ablation, same leak;
* ``PCGrad``: on the per-task gradients of all parameters.

The table gives the target's test accuracy (mean +- std over seeds) and the
paired difference to ``sum`` with a 95% interval (``*``: excludes 0).

    python benchmarks/transfer.py                 # full: 10 seeds, 3 target sizes
    python benchmarks/transfer.py --quick         # seconds; writes nothing
"""

from __future__ import annotations

from collections.abc import Sequence

import _common
import _multitask
import numpy as np
from multidigits import HYPERPARAMETERS

import optax_graddrop as ogd
from optax_graddrop import problems

TARGET_SIZES = (50, 200, 1000)
TARGET_BATCH = 32
LEAK_ON_TARGET = [0.0, 0.0, 1.0]  # sources, then the target

METHODS: dict[str, tuple[_multitask.Method, bool]] = {  # (method, target only)
  "target only": (_multitask.Method(), True),
  "sum": (_multitask.Method(), False),
  "GradDrop, leak 0": (_multitask.Method(fork={}), False),
  "GradDrop, leak 1 on the target": (_multitask.Method(fork={"leak": LEAK_ON_TARGET}), False),
  "random GradDrop, leak 1 on the target": (
    _multitask.Method(fork={"keep": "random", "leak": LEAK_ON_TARGET}),
    False,
  ),
  "PCGrad": (_multitask.Method(aggregator=ogd.pcgrad_transform), False),
}


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, np.ndarray]]:
  parser = _common.argument_parser(__doc__, steps=HYPERPARAMETERS.steps)
  parser.set_defaults(seeds=10)
  args = parser.parse_args(argv)
  hp = HYPERPARAMETERS._replace(steps=args.steps)
  sizes, seeds = TARGET_SIZES, args.seeds
  if args.quick:
    hp, sizes, seeds = hp._replace(steps=6, batch_size=16), (8,), 1
  from tqdm import tqdm

  jobs = [(size, name, seed) for size in sizes for seed in range(seeds) for name in METHODS]
  accuracy: dict[int, dict[str, list[float]]] = {
    size: {name: [] for name in METHODS} for size in sizes
  }
  data_of = {
    size: problems.digit_transfer(size, *((256, 128) if args.quick else ())) for size in sizes
  }
  for size, name, seed in tqdm(jobs, desc="training", disable=args.quick):
    method, target_only = METHODS[name]
    transfer = _multitask.Transfer(data_of[size].target_labelled, TARGET_BATCH, target_only)
    run = _multitask.train(data_of[size].data, method, hp, seed, transfer=transfer)
    accuracy[size][name].append(100 * float(run.accuracy[-1]))

  results = {
    size: {n: np.array(v) for n, v in by_name.items()} for size, by_name in accuracy.items()
  }
  header = ["method"] + [f"{size} target labels (%)" for size in sizes]
  header += [f"vs sum, {size}" for size in sizes]
  rows = []
  for name in METHODS:
    rows.append(
      [name]
      + [_common.mean_std(results[size][name]) for size in sizes]
      + [
        "-"
        if name == "sum"
        else _common.paired_difference(results[size][name], results[size]["sum"])
        for size in sizes
      ]
    )
  text = (
    f"# Transfer: target test accuracy (left digit heavy ink), {seeds} seeds\n\n"
    f"{len(data_of[sizes[0]].data.train_images):,} source-labelled training images, "
    f"{len(data_of[sizes[0]].data.test_images):,} test images; batches of "
    f"{hp.batch_size} + {TARGET_BATCH} target-labelled; Adam lr {hp.learning_rate:g}, "
    f"{hp.steps} steps (MultiDigits' settings, lr tuned on its sum).\n\n"
    f"{_common.markdown_table(header, rows)}\n\n"
    f"Differences: paired over seeds, mean [95% interval]; * excludes 0.\n\n"
    f"Machine: {_common.machine()}"
  )
  _common.report(args, "transfer", text, lambda: _figure(results, seeds))
  return results


def _figure(results: dict[int, dict[str, np.ndarray]], seeds: int):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sizes = sorted(results)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name in METHODS:
    means = [results[s][name].mean() for s in sizes]
    stds = [results[s][name].std() for s in sizes]
    ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=name)
  ax.set_xscale("log")
  ax.set_xticks(sizes, [str(s) for s in sizes])
  ax.set_xlabel("target-labelled training images")
  ax.set_ylabel("target test accuracy (%)")
  ax.set_title(f"Transfer from two digit tasks, {seeds} seeds (mean +- std)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


if __name__ == "__main__":
  main()
