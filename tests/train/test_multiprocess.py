"""Two OS processes joined by `jax.distributed` on 127.0.0.1, 2 CPU devices each, one
(data=2, fsdp=2) mesh across them, run the real `uip2p train` (smoke experiment, 32 px): each
process reads its slice of the data, orbax saves and restores across both; SIGTERM to one
process -> JAX's preemption sync makes both save the same step and exit 75 -> the rerun resumes
-> every step's metrics equal those of an uninterrupted two-process run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL_STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, logs):
  """Both processes of one run (the same command, as a launcher would start them)."""
  port = _free_port()
  command = [sys.executable, "-m", "uip2p_jax", "train", "--config", "experiments/smoke.py",
             "--workdir", workdir, f"--config.total_steps={TOTAL_STEPS}",
             "--config.checkpoint.every=100", "--config.batch_size=8",
             "--config.data.resolution=32", "--config.mesh.data=2", "--config.mesh.fsdp=2",
             "--config.sample.every=0", "--config.final_edit=false", "--config.export=false",
             "--config.log_every=1"]
  processes = []
  for index in (0, 1):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(index))
    log = open(os.path.join(logs, f"{os.path.basename(workdir)}_{index}.log"), "w")
    processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
  return processes


def _wait(processes, logs, timeout=400):
  try:
    codes = [p.wait(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  tails = "\n".join(open(os.path.join(logs, name)).read()[-1500:]
                    for name in sorted(os.listdir(logs)))
  return codes, tails


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_preempt_together_and_resume_exactly(tmp_path):
  logs = str(tmp_path / "logs")
  os.makedirs(logs)
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  codes, tails = _wait(_start(reference, logs), logs)
  assert codes == [0, 0], tails

  processes = _start(resumed, logs)
  metrics = os.path.join(resumed, "metrics.jsonl")
  deadline = time.time() + 400
  while not (os.path.exists(metrics) and any(row["step"] >= 2 for row in _metrics(resumed))):
    assert time.time() < deadline and all(p.poll() is None for p in processes), \
        _wait(processes, logs, timeout=1)[1]
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)  # one host is preempted
  codes, tails = _wait(processes, logs)
  assert codes == [75, 75], tails
  saved = sorted(int(name) for name in os.listdir(os.path.join(resumed, "checkpoints")))
  assert len(saved) == 1 and 2 <= saved[0] < TOTAL_STEPS, (saved, tails)
  for index in (0, 1):
    with open(os.path.join(logs, f"resumed_{index}.log")) as f:
      assert f"train: interrupted: saved step {saved[0]}" in f.read(), tails

  codes, tails = _wait(_start(resumed, logs), logs)
  assert codes == [0, 0], tails
  expected, got = _metrics(reference), _metrics(resumed)
  assert [row["step"] for row in got] == list(range(1, TOTAL_STEPS + 1)), got
  for want, row in zip(expected, got):
    for name in ("loss", "loss_clip", "loss_sim", "loss_attn", "loss_recon", "grad_norm"):
      assert row[name] == want[name], (row["step"], name, row[name], want[name])
