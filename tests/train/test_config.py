"""`uip2p train`'s command line and experiment files: every mistake is a one-line error
naming the key or file, raised before the workdir is created."""

import os

import pytest

from uip2p_jax.train import config as run_config
from uip2p_jax.train.loop import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
UIP2P = os.path.join(ROOT, "experiments", "uip2p.py")


def test_overrides_are_typed_and_nested():
  command = run_config.parse_command_line(
      ["--config", SMOKE, "--workdir", "w", "--config.total_steps=7", "--config.cycle.reencode",
       "true", "--config.loss.sim=0.5", "--config.model.preset=sd15"])
  config = command.config
  assert (config.total_steps, config.cycle.reencode, config.loss.sim) == (7, True, 0.5)
  assert config.model.preset == "sd15" and command.workdir == "w"


@pytest.mark.parametrize("argv, message", [
    (["--config.foo=1"], r"--config.foo: config has no key 'foo' \(keys: \["),
    (["--config.cycle.start=nosie"], r"cycle.start"),
    (["--config.optim.accumulate=0"], r"config.optim.accumulate=0; expected >= 1"),
    (["--config.model.compute_dtype=fp16"], r"dtype 'fp16'"),
    (["--config.model.remat=some"], r"config.model.remat='some'"),
    (["--config.profile_steps=5"], r"expected 'START,COUNT'"),
    (["--config.sample.count=0", "--config.final_edit=false"],
     r"config.sample.count=0 with config.sample.every=100: .*or sample.every=0"),
    (["--config.loss.recon_kind=l3"], r"recon_kind"),
    (["--config.data.dir=ftp://host/data"], r"config.data.dir='ftp://host/data': ftp:// is not a"),
    (["--config.cycle.bogus=1"], r"cycle has no key 'bogus'"),
    (["--config.total_steps=many"], r"--config.total_steps='many': expected a int"),
    (["--config.cycle.share_noise=maybe"], r"expected a bool"),
    (["--frobnicate"], r"unknown argument '--frobnicate'"),
    (["--config.model.prediction_type=v"], r"config.model.prediction_type='v'; expected 'auto'"),
    (["--config.export_every=100", "--config.export=false"],
     r"config.export_every=100 with config.export=False; expected 0"),
])
def test_bad_overrides_are_named(tmp_path, argv, message):
  workdir = str(tmp_path / "run")
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.parse_command_line(["--config", SMOKE, "--workdir", workdir] + argv)
  assert not os.path.exists(workdir)


def test_bad_files_and_arguments(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  with pytest.raises(run_config.ConfigError, match="experiment config 'nope.py' not found"):
    run_config.parse_command_line(["--config", "nope.py", "--workdir", workdir])
  with pytest.raises(run_config.ConfigError,
                     match=r"data='nonexistent'; expected one of \['cc12m', 'cc3m', 'ip2p'\]"):
    run_config.parse_command_line(["--config", f"{UIP2P}:data=nonexistent", "--workdir", workdir])
  with pytest.raises(run_config.ConfigError, match=r"expected NAME=VALUE with NAME one of"):
    run_config.parse_command_line(["--config", f"{UIP2P}:dta=cc3m", "--workdir", workdir])
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(run_config.ConfigError, match="is a file; expected a folder"):
    run_config.parse_command_line(["--config", SMOKE, "--workdir", str(a_file)])
  # Through the command: one line on stderr, status 2, nothing created.
  assert main(["--config", SMOKE, "--workdir", workdir, "--config.foo=1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("uip2p train: error: --config.foo"), err
  assert not os.path.exists(workdir)


def test_experiment_files_refuse_unknown_keys(tmp_path):
  experiments = tmp_path / "experiments"
  experiments.mkdir()
  with open(os.path.join(ROOT, "experiments", "common.py")) as f:
    (experiments / "common.py").write_text(f.read())
  (experiments / "typo.py").write_text(
      "import common\n\ndef get_config(arg=None):\n"
      "  return common.override(common.base_config(), {'optim': dict(learning_rate=1.0)})\n")
  with pytest.raises(run_config.ConfigError,
                     match=r"config.optim.learning_rate is not a config key"):
    run_config.load_config(str(experiments / "typo.py"))


def test_every_experiment_translates():
  """Each shipped experiment's sections become the code's configs (no stray keys)."""
  names = [n for n in sorted(os.listdir(os.path.join(ROOT, "experiments")))
           if n.endswith(".py") and n != "common.py"]
  assert {"smoke.py", "uip2p.py", "ip2p_supervised.py"} <= set(names)
  for name in names:
    config = run_config.load_config(os.path.join(ROOT, "experiments", name))
    run_config.cycle_config(config)
    run_config.loss_config(config)
    run_config.check_objective_data(config)


def test_supervised_objective_needs_pairs():
  config = run_config.load_config(os.path.join(ROOT, "experiments", "ip2p_supervised.py"))
  config.data.kind = "captions"
  with pytest.raises(run_config.ConfigError, match="trains on config.data.kind 'ip2p', got 'captions'"):
    run_config.check_objective_data(config)


def test_main_maps_outcomes_to_exit_statuses(tmp_path, monkeypatch, capsys):
  """0 finished, 75 preempted (checkpoint saved), 2 a refused resume or a bad dataset."""
  from uip2p_jax.train import loop
  from uip2p_jax.train.checkpoint import EXIT_PREEMPTED, ResumeError
  argv = ["--config", SMOKE, "--workdir", str(tmp_path / "run")]
  outcomes = {"finished": loop.TrainResult({}, preempted=False),
              "preempted": loop.TrainResult({}, preempted=True)}
  for name, status in (("finished", 0), ("preempted", EXIT_PREEMPTED)):
    monkeypatch.setattr(loop, "train", lambda config, workdir, r=outcomes[name]: r)
    assert main(argv) == status, name

  def refuse(config, workdir):
    raise ResumeError("checkpoint x holds another train state")
  monkeypatch.setattr(loop, "train", refuse)
  assert main(argv) == 2
  assert capsys.readouterr().err.strip() == ("uip2p train: error: checkpoint x holds another "
                                             "train state")


def test_a_missing_dataset_fails_before_the_workdir_exists(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert main(["--config", SMOKE, "--workdir", workdir,
               f"--config.data.dir={tmp_path / 'nothing'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.data.dir=" in err[0], err
  assert not os.path.exists(workdir)


def test_an_ip2p_v_model_trains_on_the_v_loss_only():
  from uip2p_jax.schedules import NoiseSchedule
  from uip2p_jax.train import step
  config = run_config.load_config(SMOKE)
  config.objective, config.data.kind = "ip2p", "ip2p"
  config.model.prediction_type = "v_prediction"  # stated: refused before anything is built
  with pytest.raises(run_config.ConfigError, match="config.ip2p.loss_weighting='epsilon' with a "
                                                   "v_prediction model.*'v'"):
    run_config.check(config)
  config.model.prediction_type = "auto"  # read from the model: refused when the step is built
  with pytest.raises(run_config.ConfigError, match="loss_weighting='epsilon' with a v_prediction "
                                                   r"model.*prediction_type='auto'\)"):
    step.make_step_functions(config, {}, {}, {}, NoiseSchedule(prediction_type="v_prediction"),
                             None, None)


def test_a_v_run_exports_a_v_scheduler_the_pipeline_samples_as_v(ip2p_folder, tmp_path):
  """An epsilon pipeline fine-tuned as a v model (the export itself, without the steps)."""
  import json

  import jax
  import jax.numpy as jnp

  from trainer_setup import tiny_config
  from uip2p_jax.model_set import build_models
  from uip2p_jax.pipeline import EditPipeline
  from uip2p_jax.sharding import make_mesh
  from uip2p_jax.train import step
  from uip2p_jax.train.samples import RunContext, export
  config = tiny_config(**{"objective": "ip2p", "data.kind": "ip2p", "export": True,
                          "model.pretrained": ip2p_folder[1], "ema_decay": 0.0,
                          "model.prediction_type": "v_prediction", "ip2p.loss_weighting": "v"})
  run_config.check(config)
  models = build_models(**run_config.model_kwargs(config))
  assert models.schedule.prediction_type == "v_prediction"
  graphs, params, frozen = step.split_models(models, config.objective)
  run = RunContext(config, str(tmp_path), graphs, frozen, models.tokenizer, models.schedule,
                   make_mesh(1, 1))
  state = step.TrainState(jnp.zeros((), jnp.int32), params, None, None, jax.random.PRNGKey(0),
                          jnp.zeros((), jnp.int32))
  out = export(run, state)
  with open(os.path.join(ip2p_folder[1], "scheduler", "scheduler_config.json")) as f:
    base = json.load(f)
  with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
    exported = json.load(f)
  assert base["prediction_type"] == "epsilon" and exported["prediction_type"] == "v_prediction"
  assert "prediction_type" not in exported.get("_use_default_values", [])
  assert {k: v for k, v in exported.items() if k not in ("prediction_type",
                                                         "_use_default_values")} == {
      k: v for k, v in base.items() if k not in ("prediction_type", "_use_default_values")}
  assert EditPipeline.from_pretrained(out).schedule.prediction_type == "v_prediction"


def test_a_cycle_timestep_beyond_the_schedule_is_refused():
  from uip2p_jax.schedules import NoiseSchedule
  from uip2p_jax.train import step
  config = run_config.load_config(SMOKE)
  config.cycle.timestep_max = 2000
  with pytest.raises(run_config.ConfigError, match="timestep_max=2000 is beyond the model's "
                                                   "1000-step"):
    step.make_step_functions(config, {}, {}, {}, NoiseSchedule(), None, None)


def test_the_training_stack_imports_without_torch():
  """`uip2p train` never needs torch (weights load from safetensors): tensorboardX imports it
  whenever it is installed, 2.6-4.4 s of every start on a 2-core CPU, unless metric_writer
  stops it (this process has torch loaded for the references: a fresh one is asked)."""
  import subprocess
  import sys
  code = ("import sys\n"
          "import uip2p_jax.cli.train, uip2p_jax.train.loop, uip2p_jax.weights, uip2p_jax.pipeline\n"
          "from uip2p_jax.train.metric_writer import SummaryWriter\n"
          "assert 'torch' not in sys.modules\n"
          "import torch  # and torch still imports afterwards, for whoever wants it\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
