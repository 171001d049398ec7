"""Many binary tasks: 12 attributes of scikit-learn's handwritten digits.

The CelebA setting of the GradDrop paper (40 binary attributes of a face)
scaled to data that ships offline: each 8x8 digit has the 12 binary
attributes of ``optax_graddrop.problems.DIGIT_ATTRIBUTES`` (even, prime,
closed loop, ..., more ink than the median digit). A small conv trunk with 12
two-class heads is trained by every method of ``_multitask.METHODS`` with the
same hyperparameters, initialisations and batches. The table gives the test
error averaged over the 12 tasks (mean +- std over seeds), the worst task's
error, training time per step relative to ``sum``, and the share of gradient
entries GradDrop keeps at the end; the results file adds the per-task errors.

    python benchmarks/attributes.py                 # full: 10 seeds (5 for PCGrad, MGDA, uncertainty)
    python benchmarks/attributes.py --quick         # seconds; writes nothing
    python benchmarks/attributes.py --tune 1e-3 3e-3 # validation accuracy of sum per learning rate
"""

from __future__ import annotations

from collections.abc import Sequence

import _common
import _multitask
import numpy as np

from optax_graddrop import problems

# The learning rate is the best of `--tune 3e-4 1e-3 3e-3 1e-2` on sum (validation
# accuracy 95.1 / 95.2 / 95.4 / 96.2 %, 2 seeds); the rest was fixed beforehand.
HYPERPARAMETERS = _multitask.Hyperparameters(learning_rate=1e-2, batch_size=64, steps=2000)
TUNING = "lr from {3e-4, 1e-3, 3e-3, 1e-2} on sum (validation 95.1 / 95.2 / 95.4 / 96.2 %)"


def main(argv: Sequence[str] | None = None) -> dict[str, list[_multitask.Run]]:
  args, hp, seeds = _multitask.parse_args(__doc__, HYPERPARAMETERS, argv)
  data = problems.digit_attributes()
  if args.tune:
    print(_multitask.tune_learning_rate(data, hp, args.tune))
    return {}

  counts = _multitask.seed_counts(args, seeds, _multitask.METHODS)
  runs = _multitask.run_all(data, hp, counts, progress=not args.quick)
  errors = {name: 100 * (1 - np.stack([r.accuracy for r in rs])) for name, rs in runs.items()}
  mean_errors = {name: e.mean(1) for name, e in errors.items()}
  rows = [
    [
      name,
      str(len(method_runs)),
      _common.mean_std(mean_errors[name]),
      _multitask.difference_to_sum(mean_errors, name),
      f"{errors[name].mean(0).max():.2f}",
      *_multitask.speed_and_kept(method_runs, runs["sum"]),
    ]
    for name, method_runs in runs.items()
  ]
  header = [
    "method",
    "seeds",
    "mean error (%)",
    "vs sum [95% CI]",
    "worst task (%)",
    "time/step vs sum",
    "kept (%)",
  ]
  per_task = _common.markdown_table(
    ["method", *data.task_names],
    [[name, *(f"{e:.1f}" for e in errors[name].mean(0))] for name in runs],
  )
  text = (
    f"# Digit attributes: {len(data.task_names)} binary tasks, test error\n\n"
    f"{_multitask.describe(data, hp, TUNING)}\n\n"
    f"{_common.markdown_table(header, rows)}\n\n"
    f"Differences to sum: paired over the same seeds, mean [95% interval]; * excludes 0.\n\n"
    f"Test error per task (%), mean over seeds:\n\n{per_task}\n\nMachine: {_common.machine()}"
  )
  _common.report(
    args,
    "attributes",
    text,
    lambda: _multitask.bar_figure(
      mean_errors,
      f"test error (%), mean of {len(data.task_names)} tasks",
      f"Digit attributes, {seeds} seeds",
    ),
  )
  return runs


if __name__ == "__main__":
  main()
