"""The demo and the benchmarks run end to end in their quick modes."""

import importlib.util
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(relative_path):
  path = ROOT / relative_path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module
  spec.loader.exec_module(module)
  return module


def test_demo_prints_a_table_of_per_task_losses(capsys):
  results = _load("examples/demo.py").main(["--steps", "30", "--seeds", "1"])
  out = capsys.readouterr().out
  for method in ("sum", "GradDrop", "random GradDrop"):
    assert f"| {method} |" in out
    assert results[method].shape == (1, 3)
    assert np.all(np.isfinite(results[method]))


def test_speed_benchmark_quick_prints_ratios(capsys):
  table = _load("benchmarks/speed.py").main(["--quick", "--tasks", "2", "3"])
  out = capsys.readouterr().out
  assert "Machine:" in out
  assert table in out
  for method in ("plain sum (floor)", "graddrop", "graddrop_transform.update"):
    assert f"| {method} |" in table
  rows = [line for line in table.splitlines() if "| graddrop |" in line]
  assert len(rows) == 2
  assert all(float(row.split("|")[-2].strip().rstrip("x")) > 0 for row in rows)
