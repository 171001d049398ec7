"""Multi-process training (examples/multihost_training.py) on 127.0.0.1.

Two processes with two CPU devices each, against one process with four:
the same parameters, checkpoints that move between them, and a clear error
(not a hang) when a process dies.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "multihost_training.py")
TIMEOUT = 120  # seconds for any one run
STEPS, EVERY = 10, 5
# The two runs differ only in how the cross-device sums are ordered (gloo
# between processes, XLA within one), so they agree to float rounding:
# measured 6e-8 absolute after 10 Adam steps on parameters of norm ~8.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def _processes(out, num_processes, *extra, heartbeat=100):
  """Starts ``num_processes`` processes of the script; always kills them at the end."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        SCRIPT,
        "--devices",
        str(4 // num_processes),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--checkpoint-every",
        str(EVERY),
        "--num-processes",
        str(num_processes),
        "--process-id",
        str(pid),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--heartbeat-timeout",
        str(heartbeat),
        *extra,
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=_env(),
    )
    for pid in range(num_processes)
  ]
  try:
    yield procs
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait(timeout=TIMEOUT)


def _finish(procs):
  outputs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out
    outputs.append(out)
  return outputs


def _run_one_process(out, *extra):
  result = subprocess.run(
    [
      *(sys.executable, SCRIPT, "--devices", "4", "--out", str(out)),
      *("--steps", str(STEPS), "--checkpoint-every", str(EVERY), *extra),
    ],
    capture_output=True,
    text=True,
    env=_env(),
    timeout=TIMEOUT,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def _final(out, method):
  return dict(np.load(out / method / "final_params.npz"))


def _assert_close(a, b):
  for name in a:
    np.testing.assert_allclose(a[name], b[name], **TOLERANCE)


def test_two_processes_train_like_one_and_checkpoints_move_between_them(tmp_path):
  two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
  with _processes(two, 2) as procs:
    outputs = _finish(procs)
  for pid, out in enumerate(outputs):
    assert f"process {pid} of 2: fork, 4 devices, step {STEPS}" in out
    assert f"process {pid} of 2: streaming, 4 devices, step {STEPS}" in out
  _run_one_process(one)
  # The 2-process checkpoint of step 5 restores in one process, which then
  # continues like the uninterrupted 2-process run.
  shutil.copytree(two, resumed)
  for method in ("fork", "streaming"):
    shutil.rmtree(resumed / method / str(STEPS))
  resumed_out = _run_one_process(resumed, "--resume")
  assert f"fork resumed at step {EVERY}" in resumed_out
  for method in ("fork", "streaming"):
    _assert_close(_final(two, method), _final(one, method))
    _assert_close(_final(resumed, method), _final(two, method))


def test_one_process_resumes_bit_for_bit(tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  _run_one_process(full, "--methods", "fork")
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "fork" / str(STEPS))
  _run_one_process(resumed, "--methods", "fork", "--resume")
  for name, value in _final(full, "fork").items():
    np.testing.assert_array_equal(_final(resumed, "fork")[name], value)


def test_a_dead_process_is_a_clear_error_and_the_last_checkpoint_restores(tmp_path):
  run = tmp_path / "run"
  with _processes(run, 2, "--methods", "fork", "--steps", "1000", heartbeat=5) as procs:
    survivor, victim = procs
    # Wait for the first checkpoint, then kill process 1 mid-run.
    deadline = time.monotonic() + TIMEOUT
    for line in victim.stdout:
      if f"checkpoint {EVERY} saved" in line or time.monotonic() > deadline:
        break
    victim.send_signal(signal.SIGKILL)
    start = time.monotonic()
    out, _ = survivor.communicate(timeout=TIMEOUT)
    elapsed = time.monotonic() - start
  assert survivor.returncode != 0, out
  assert elapsed < 60, elapsed
  # The runtime names the failure rather than hanging in a collective.
  assert any(word in out for word in ("heartbeat", "unhealthy", "Connection", "connect")), out[
    -3000:
  ]
  # The last completed checkpoint is intact: a new run restores it and goes on.
  latest = max(int(path.name) for path in (run / "fork").iterdir() if path.name.isdigit())
  assert latest >= EVERY
  resumed_out = _run_one_process(run, "--methods", "fork", "--resume", "--steps", str(latest + 2))
  assert f"fork resumed at step {latest}" in resumed_out
  assert f"fork, 4 devices, step {latest + 2}" in resumed_out
