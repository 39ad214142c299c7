"""launch/tpu_pod.sh --dry-run: the gcloud commands it would run, without gcloud installed."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_pod.sh"
TRAIN = ["train", "--config", "experiments/uip2p.py:data=cc3m", "--workdir", "gs://BUCKET/run"]


@pytest.fixture(scope="module")
def path_without_gcloud(tmp_path_factory):
  """A PATH holding only the tools the dry run needs (this machine may have gcloud)."""
  tools = tmp_path_factory.mktemp("bin")
  for tool in ("dirname", "sed"):
    (tools / tool).symlink_to(shutil.which(tool))
  assert shutil.which("gcloud", path=str(tools)) is None
  return str(tools)


def dry_run(path, *args, env=None):
  result = subprocess.run([shutil.which("bash"), str(SCRIPT), "--dry-run", *args],
                          env={"PATH": path, "HOME": "/nonexistent", **(env or {})},
                          capture_output=True, text=True, timeout=60)
  return result, [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(commands):
  """The argv the workers run `python -m uip2p_jax` with, read back from the ssh --command."""
  ssh = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"])
  words = shlex.split(ssh[ssh.index("--command") + 1])
  start = words.index("uip2p_jax", words.index("-m"))
  return ssh, words[start + 1:]


def test_v5e_dry_run_prints_create_copy_and_run(path_without_gcloud):
  result, commands = dry_run(path_without_gcloud, "NAME", "ZONE", "v5litepod-16", "--", *TRAIN)
  assert result.returncode == 0, result.stderr
  create, archive, scp, ssh = commands
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "NAME", "--zone", "ZONE",
                    "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite"]
  assert archive[:2] == ["git", "-C"] and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "NAME:uip2p_jax.tar.gz",
                 "--zone", "ZONE", "--worker=all"]
  ssh, argv = remote_command(commands)
  assert ssh[5:9] == ["NAME", "--zone", "ZONE", "--worker=all"]
  assert argv == TRAIN
  script = ssh[ssh.index("--command") + 1]
  assert "UIP2P_DISTRIBUTED=1 exec .venv/bin/python -m uip2p_jax train --config " \
         "experiments/uip2p.py:data=cc3m --workdir gs://BUCKET/run" in script
  # Python >= 3.11 on the workers (the TPU images' python3 is 3.10), then the TPU jax extra.
  assert "uv python install 3.11" in script and "sys.version_info < (3, 11)" in script
  assert 'UIP2P_JAX=tpu PYTHON="$python" bash launch/setup.sh' in script


def test_arguments_with_spaces_and_quotes_reach_the_workers_intact(path_without_gcloud):
  train = ["train", "--config", "experiments/uip2p.py:data=cc3m,losses=full",
           "--config.note=it's \"a\" test; $HOME", "--workdir", "gs://b/r un"]
  result, commands = dry_run(path_without_gcloud, "n", "z", "v4-32", "--", *train)
  assert result.returncode == 0, result.stderr
  assert remote_command(commands)[1] == train


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v5litepod-32", "v2-alpha-tpuv5-lite"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_runtime_follows_the_accelerator(path_without_gcloud, accelerator, runtime):
  result, commands = dry_run(path_without_gcloud, "n", "z", accelerator, "--", "demo")
  assert result.returncode == 0, result.stderr
  assert commands[0][-2:] == ["--version", runtime]


def test_runtime_override_spot_and_queued_resource(path_without_gcloud):
  result, commands = dry_run(path_without_gcloud, "--queued", "--spot", "n", "z", "v6e-8", "--",
                             "demo", env={"TPU_VERSION": "v2-alpha-tpuv6e-custom"})
  assert result.returncode == 0, result.stderr
  assert commands[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "n",
                         "--node-id", "n", "--zone", "z", "--accelerator-type", "v6e-8",
                         "--runtime-version", "v2-alpha-tpuv6e-custom", "--spot"]
  assert commands[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "n",
                         "--zone", "z", "--format", "value(state.state)"]


@pytest.mark.parametrize("args,message", [
    (["n", "z", "v9-8", "--", "demo"], "no runtime known for accelerator type v9-8"),
    (["n", "z", "v4-8", "demo"], "Run a `uip2p` command"),
    (["--fast", "n", "z", "v4-8", "--", "demo"], "unknown option --fast")])
def test_bad_arguments_exit_2_with_a_message(path_without_gcloud, args, message):
  result, _ = dry_run(path_without_gcloud, *args)
  assert result.returncode == 2 and message in result.stderr
  assert result.stdout == ""
