"""MultiMNIST-style two-digit classification from scikit-learn's digits.

Each 10x10 image overlays two real handwritten 8x8 digits (top-left and
bottom-right, offset 2, pixelwise max; ``optax_graddrop.problems.multidigits``),
and two tasks classify them. A small conv trunk with two linear heads is
trained by every method of ``_multitask.METHODS`` with the same
hyperparameters, initialisations and batches; the table gives test accuracy
(mean +- std over seeds), training time per step relative to ``sum``, and the
share of gradient entries GradDrop keeps at the end of training.

    python benchmarks/multidigits.py                 # full: 10 seeds (5 for PCGrad, MGDA, uncertainty)
    python benchmarks/multidigits.py --quick         # seconds; writes nothing
    python benchmarks/multidigits.py --tune 1e-3 3e-3 # validation accuracy of sum per learning rate
"""

from __future__ import annotations

from collections.abc import Sequence

import _common
import _multitask
import numpy as np

from optax_graddrop import problems

# The learning rate is the best of `--tune 3e-4 1e-3 3e-3 1e-2` on sum (validation
# accuracy 97.1 / 98.7 / 99.3 / 98.5 %, 2 seeds); the rest was fixed beforehand.
HYPERPARAMETERS = _multitask.Hyperparameters(learning_rate=3e-3, batch_size=128, steps=3000)
TUNING = "lr from {3e-4, 1e-3, 3e-3, 1e-2} on sum (validation 97.1 / 98.7 / 99.3 / 98.5 %)"


def main(argv: Sequence[str] | None = None) -> dict[str, list[_multitask.Run]]:
  args, hp, seeds = _multitask.parse_args(__doc__, HYPERPARAMETERS, argv)
  data = problems.multidigits(num_train=256, num_test=128) if args.quick else problems.multidigits()
  if args.tune:
    print(_multitask.tune_learning_rate(data, hp, args.tune))
    return {}

  counts = _multitask.seed_counts(args, seeds, _multitask.METHODS)
  runs = _multitask.run_all(data, hp, counts, progress=not args.quick)
  averages = {name: np.array([100 * r.accuracy.mean() for r in rs]) for name, rs in runs.items()}
  rows = []
  for name, method_runs in runs.items():
    accuracy = np.stack([run.accuracy for run in method_runs])
    rows.append(
      [
        name,
        str(len(method_runs)),
        _common.mean_std(accuracy[:, 0], 100),
        _common.mean_std(accuracy[:, 1], 100),
        _common.mean_std(accuracy.mean(1), 100),
        _multitask.difference_to_sum(averages, name),
        *_multitask.speed_and_kept(method_runs, runs["sum"]),
      ]
    )
  header = [
    "method",
    "seeds",
    "left (%)",
    "right (%)",
    "average (%)",
    "average vs sum [95% CI]",
    "time/step vs sum",
    "kept (%)",
  ]
  table = _common.markdown_table(header, rows)
  text = (
    f"# MultiDigits: test accuracy, mean +- std over seeds\n\n"
    f"{_multitask.describe(data, hp, TUNING)}\n\n"
    f"{table}\n\nDifferences to sum: paired over the same seeds, mean [95% interval]; "
    f"* excludes 0.\n\nMachine: {_common.machine()}"
  )
  _common.report(
    args,
    "multidigits",
    text,
    lambda: _multitask.bar_figure(
      averages, "test accuracy (%), mean of 2 tasks", f"MultiDigits, {seeds} seeds"
    ),
  )
  return runs


if __name__ == "__main__":
  main()
