"""What every benchmark script shares: the machine line, tables, result files."""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
  """The CPU's model name, as ``lscpu`` prints it (from ``/proc/cpuinfo``)."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def machine() -> str:
  """One line naming the machine, its CPU, and the JAX backend and device (the GPU's
  model on a GPU) the numbers come from."""
  devices = jax.devices()
  count = f" x {len(devices)}" if len(devices) > 1 else ""
  return (
    f"{platform.machine()} {platform.system()}, {cpu_model()}, {os.cpu_count()} CPUs, "
    f"jax {jax.__version__} on {devices[0].platform} ({devices[0].device_kind}{count})"
  )


def mean_std(values: Any, scale: float = 1.0, digits: int = 2) -> str:
  """``"mean +- std"`` of ``values * scale`` (std over seeds, ddof 0)."""
  values = np.asarray(values, dtype=np.float64) * scale
  return f"{values.mean():.{digits}f} +- {values.std():.{digits}f}"


def paired_difference(values: Any, baseline: Any, scale: float = 1.0, digits: int = 2) -> str:
  """The mean difference to ``baseline`` over the same seeds, with a 95% interval.

  A paired t-interval (the seeds pair the runs: same initialisation and
  batches); a ``*`` marks an interval that excludes 0.
  """
  from scipy import stats

  diff = (np.asarray(values, np.float64) - np.asarray(baseline, np.float64)) * scale
  if len(diff) < 2:
    return f"{diff.mean():+.{digits}f}"
  half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
  low, high = diff.mean() - half, diff.mean() + half
  star = "*" if low > 0 or high < 0 else ""
  return f"{diff.mean():+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{star}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table; the first column left-aligned, the others right-aligned."""
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def write_text(out_dir: pathlib.Path | str, name: str, text: str) -> str:
  """Writes ``<name>.md`` under ``out_dir``, headed by the command that made it."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.md"
  script = pathlib.Path(sys.argv[0]).resolve()
  if script.is_relative_to(RESULTS_DIR.parents[1]):
    script = script.relative_to(RESULTS_DIR.parents[1])
  command = " ".join(["python", str(script), *sys.argv[1:]])
  path.write_text(f"Command: `{command}`\n\n{text}\n")
  return str(path)


def save_figure(figure: Any, out_dir: pathlib.Path | str, name: str) -> str:
  """Saves ``<name>.png`` under ``out_dir``."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.png"
  figure.savefig(path, dpi=110, bbox_inches="tight")
  return str(path)


def write_results(out_dir: pathlib.Path | str, name: str, text: str, figure: Any) -> list[str]:
  """Writes ``<name>.md`` and ``<name>.png`` under ``out_dir``; returns the paths."""
  return [write_text(out_dir, name, text), save_figure(figure, out_dir, name)]


def report(args: argparse.Namespace, name: str, text: str, figure: Callable[[], Any]) -> None:
  """Prints a benchmark's markdown; writes it and ``figure()`` where ``output_dir`` says."""
  print(text)
  out = output_dir(args)
  if out is not None:
    print("\n".join(write_results(out, name, text, figure())))


def argument_parser(doc: str, steps: int) -> argparse.ArgumentParser:
  """The options every quality benchmark has: --quick, --seeds, --steps, --out."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--out", default=None, help="results folder (default: results/ when full)")
  return parser


def output_dir(args: argparse.Namespace) -> pathlib.Path | str | None:
  """Where results go: ``--out``, else ``results/`` for full runs, else nowhere."""
  return args.out or (None if args.quick else RESULTS_DIR)
