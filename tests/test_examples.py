"""The demo and the benchmarks run end to end in their quick modes."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(relative_path):
  path = ROOT / relative_path
  # The benchmarks import their shared helpers as sibling modules.
  if str(path.parent) not in sys.path:
    sys.path.insert(0, str(path.parent))
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


def test_speed_benchmark_quick_prints_ratios(capsys, tmp_path):
  text = _load("benchmarks/speed.py").main(["--quick", "--tasks", "2", "3", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert text in out and "Machine:" in text
  blocks = text.split("\n## ")[1:]
  sections = ["Aggregation", "Many tasks", "Unaligned sizes", "Leaf count", "Training steps"]
  for section in [*sections, "Parameter level, MLP", "Parameter level, conv", "Scaling"]:
    assert any(block.startswith(section) for block in blocks), section
  aggregation = [block for block in blocks if block.startswith("Aggregation")]
  assert len(aggregation) == 2  # T = 2 and 3
  for method in ("plain sum (floor)", "graddrop", "graddrop_transform.update (defaults: stats on)"):
    assert all(f"| {method} |" in block for block in aggregation)
  rows = [line for block in aggregation for line in block.splitlines() if "| graddrop |" in line]
  assert len(rows) == 2
  for row in rows:
    vs_floor, bandwidth = (cell.strip() for cell in row.split("|")[-3:-1])
    assert float(vs_floor.rstrip("x")) > 0 and float(bandwidth.rstrip("%")) > 0
  (many_tasks,) = [block for block in blocks if block.startswith("Many tasks")]
  assert all(f"| {method} |" in many_tasks for method in ("graddrop", "pcgrad", "mgda"))
  steps = ("stacked step", "streaming step, chunk_size=1", "stacked step / sum of its parts")
  for block in blocks:
    if block.startswith("Parameter level, MLP"):  # once per matmul precision
      for method in steps:
        assert sum(f"| {method} |" in line for line in block.splitlines()) == 2  # T = 2 and 4
  assert "| graddrop_value_and_grad, chunk_size=1 |" in text  # the conv model's rows
  (written,) = tmp_path.glob("speed_*.md")
  assert written.read_text().strip().endswith(text)
  (plot,) = tmp_path.glob("param_level*.png")
  assert plot.stat().st_size > 10_000


def test_compile_time_benchmark_quick_compares_the_steps(tmp_path, capsys):
  text = _load("benchmarks/compile_time.py").main(["--quick", "--out", str(tmp_path)])
  assert text in capsys.readouterr().out
  rows = [
    line for line in text.splitlines() if line.startswith(("| plain", "| stacked", "| streaming"))
  ]
  assert len(rows) == 6  # three steps, then the same with scanned blocks
  assert sum("| scanned |" in row for row in rows) == 3
  for row in rows:
    total, ratio = (cell.strip() for cell in row.split("|")[-3:-1])
    assert float(total) > 0 and float(ratio.rstrip("x")) > 0
  (written,) = tmp_path.glob("compile_*.md")
  assert written.read_text().strip().endswith(text)


def test_toy_benchmark_quick_writes_tables_and_figure(tmp_path, capsys):
  text = _load("benchmarks/toy.py").main(["--quick", "--out", str(tmp_path)])
  assert text in capsys.readouterr().out
  for method in ("mean", "GradDrop", "random GradDrop", "PCGrad", "MGDA"):
    rows = [line for line in text.splitlines() if line.startswith(f"| {method} |")]
    assert len(rows) == 3 + 1 + 1  # three starts, the grid, the 1-D toy
  written = (tmp_path / "toy.md").read_text()
  assert written.startswith("Command: `python ")
  assert written.strip().endswith(text)
  assert (tmp_path / "toy.png").stat().st_size > 10_000


@pytest.mark.parametrize(("script", "columns"), [("multidigits", 8), ("attributes", 7)])
def test_multitask_benchmarks_quick(tmp_path, capsys, script, columns):
  runs = _load(f"benchmarks/{script}.py").main(["--quick", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  methods = _load("benchmarks/_multitask.py").METHODS
  assert list(runs) == list(methods)
  for name, method_runs in runs.items():
    (run,) = method_runs
    assert np.all((run.accuracy >= 0) & (run.accuracy <= 1)) and run.seconds_per_step > 0
    graddrop = "GradDrop" in name
    assert np.isnan(run.kept_fraction) != graddrop
    if graddrop:
      assert 0.0 < run.kept_fraction < 1.0
    row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    assert row.count("|") == columns + 1
  assert (tmp_path / f"{script}.md").exists() and (tmp_path / f"{script}.png").exists()


def test_transfer_benchmark_quick(tmp_path, capsys):
  results = _load("benchmarks/transfer.py").main(["--quick", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  methods = _load("benchmarks/transfer.py").METHODS
  (size,) = results
  assert list(results[size]) == list(methods)
  for name in methods:
    assert np.all((results[size][name] >= 0) & (results[size][name] <= 100))
    assert f"| {name} |" in out
  assert (tmp_path / "transfer.md").exists() and (tmp_path / "transfer.png").exists()
