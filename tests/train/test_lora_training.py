"""LoRA training: only the factors are differentiated, updated and held in the optimizer and the
EMA (ip2p compiled and stepped; cec traced), on one device and on a (data, fsdp) mesh; the
export writes the merged UNet and the LoRA file; a run starts from a LoRA file; config.lora
mistakes are named."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer_setup import tiny_config
from uip2p_jax import sharding as shd
from uip2p_jax import weights
from uip2p_jax.model_set import build_models
from uip2p_jax.models import lora
from uip2p_jax.train import config as run_config
from uip2p_jax.train import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.targets": "attn,conv"}
IP2P = {"objective": "ip2p", "data.kind": "ip2p"}


def lora_parts(**overrides):
  config = tiny_config(**dict(LORA, **overrides))
  run_config.check(config)
  models = build_models(**run_config.model_kwargs(config))
  graphs, params, frozen = train_step.split_models(models, config.objective)
  return config, models, graphs, params, frozen


def leaf_names(tree):
  return {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_ip2p_step_trains_only_the_lora_factors():
  # Attention targets only: the smallest program (conv factors run in tests/models/test_lora.py).
  config, models, graphs, params, frozen = lora_parts(**IP2P, **{"lora.targets": "attn"})
  assert leaf_names(params) == {"lora_a", "lora_b"}
  assert "unet" in frozen and not {"lora_a", "lora_b"} & leaf_names(frozen["unet"])
  functions = train_step.make_step_functions(config, graphs, params, frozen, models.schedule,
                                             models.tokenizer, shd.make_mesh(1, 1))
  placed = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
  batch = train_step.synthetic_batch(config, 8, functions.batch_sharding)
  state = functions.init_state(params, seed=0)
  # AdamW's moments and the EMA are the factors' tree: nothing of the base UNet.
  adam = state.opt_state[1][0]
  for tree in (adam.mu, adam.nu, state.ema_params):
    assert jax.tree.structure(tree) == jax.tree.structure(state.params)
  assert len(jax.tree.leaves(state.opt_state)) == 2 * len(jax.tree.leaves(params)) + 2
  # Unoptimised code generation: compiles ~4x faster, and this step runs twice.
  step = functions.step.lower(state, placed, batch).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  before, frozen_before = jax.device_get(state.params), jax.device_get(placed)
  for _ in range(2):
    state, metrics = step(state, placed, batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  assert metrics["skipped_updates"] == 0
  after = jax.device_get(state.params)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after))]
  assert sum(changed) > 0.9 * len(changed), f"{sum(changed)} of {len(changed)} factors changed"
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(placed))


def test_cec_step_differentiates_only_the_lora_factors():
  """Traced, not compiled (the cycle's step compiles for ~20 s here; the mechanics it shares
  with ip2p run above): the CEC objective's state and metrics with LoRA and its dropout."""
  config, models, graphs, params, frozen = lora_parts()
  functions = train_step.make_step_functions(config, graphs, params, frozen, models.schedule,
                                             models.tokenizer, shd.make_mesh(1, 1))
  abstract_frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 frozen, functions.frozen_shardings)
  batch = train_step.abstract_batch(config, 8, functions.batch_sharding)
  state, metrics = jax.eval_shape(functions.step, functions.abstract_state, abstract_frozen,
                                  batch)
  assert leaf_names(state.params) == {"lora_a", "lora_b"}
  assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.params)
  assert {"loss", "loss_clip", "loss_attn", "grad_norm"} <= set(metrics)


SHARDED = r"""
import os, sys
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
import jax
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from trainer_setup import tiny_config
from uip2p_jax import sharding as shd
from uip2p_jax.model_set import build_models
from uip2p_jax.train import config as run_config, step as train_step

shd.MIN_SHARDED_SIZE = 256  # the tiny model's arrays are small: shard them anyway
config = tiny_config(**{"lora.rank": 8, "lora.targets": "attn,ff"})
models = build_models(**run_config.model_kwargs(config))
graphs, params, frozen = train_step.split_models(models, config.objective)
mesh = shd.make_mesh(4, 2)
functions, lowered = train_step.lower_step(config, graphs, params, frozen, models.schedule,
                                           models.tokenizer, mesh, 8)
specs = lambda tree: [tuple(s.spec) for s in jax.tree.leaves(tree)]
lora_specs = specs(functions.state_shardings.params)
base_specs = specs(functions.frozen_shardings["unet"])
assert any("fsdp" in s for s in lora_specs), lora_specs   # large factors split like any parameter
assert any("fsdp" in s for s in base_specs), base_specs   # the frozen base UNet is split too
assert specs(functions.state_shardings.opt_state[1][0].mu) == lora_specs
assert "fsdp" in lowered.as_text()
print("lowered", len(lora_specs), "factors")
"""


def test_lora_step_lowers_on_a_data_fsdp_mesh(tmp_path):
  """The LoRA step on a (data=4, fsdp=2) mesh of 8 simulated devices: factors, their moments
  and the frozen base UNet are split over fsdp by the parameter rule; lowered (not compiled)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED, ROOT], capture_output=True, text=True,
                          env=env, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  assert "lowered" in result.stdout


def test_export_writes_the_merged_unet_and_the_lora_file(tmp_path):
  from uip2p_jax.train.samples import RunContext, export
  config, models, graphs, params, frozen = lora_parts(**{"export": True})
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # non-zero B: the merge must show
      lambda path, x: (rng.normal(size=x.shape) * 0.05).astype(np.float32)
      if path[-1].key == "lora_b" else np.asarray(x), params)
  mesh = shd.make_mesh(1, 1)
  run = RunContext(config, str(tmp_path), graphs, frozen, models.tokenizer, models.schedule, mesh)
  state = train_step.TrainState(jnp.zeros((), jnp.int32), params, None, None,
                                jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))
  out = export(run, state)
  trained = train_step.merge_module(graphs["unet"], params, frozen["unet"])
  # unet/: the merged UNet, a plain diffusers UNet.
  exported = weights.module_tensors(weights.load_unet(os.path.join(out, "unet"), subfolder=None))
  merged = weights.module_tensors(lora.merge_lora(trained))
  assert set(exported) == set(merged)
  for key, value in merged.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  base_q = frozen["unet"]["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn1"][
      "to_q"]["kernel"]
  q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
  assert np.abs(exported[q] - np.asarray(base_q).T).max() > 1e-3
  # lora/: the factors, which load back onto the base and into a run (config.lora.init_from).
  lora_file = os.path.join(out, "lora", weights.LORA_WEIGHTS)
  tensors = weights.read_lora(lora_file)[0]
  assert set(tensors) == set(lora.lora_layers(trained))
  with open(os.path.join(out, "README.md")) as f:  # the model card names the LoRA settings
    card = f.read()
  assert "- lora\n" in card and f"rank {config.lora.rank}," in card
  config.lora.init_from = lora_file
  run_config.check(config)
  restarted = build_models(**run_config.model_kwargs(config)).unet
  for name, layer in lora.lora_layers(restarted).items():
    original = lora.lora_layers(trained)[name]
    np.testing.assert_allclose(layer.lora_a.get_value(), original.lora_a.get_value())
    np.testing.assert_allclose(layer.lora_b.get_value(), original.lora_b.get_value(), rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"lora.rank": -1}, r"config.lora: lora rank -1; expected an integer >= 1"),
    ({"lora.rank": 4, "lora.alpha": -1.0}, r"lora alpha -1.0; expected >= 0"),
    ({"lora.rank": 4, "lora.dropout": 1.0}, r"lora dropout 1.0; expected 0 <= dropout < 1"),
    ({"lora.rank": 4, "lora.targets": "attn,mlp"}, r"lora targets \['mlp'\] unknown; expected "
                                                    r"some of \['attn', 'conv', 'ff'\]"),
    ({"lora.rank": 4, "lora.targets": ","}, r"lora targets are empty"),
    ({"lora.rank": 4, "objective": "vae", "data.kind": "world"},
     r"config.lora.rank=4: LoRA adapts the UNet; objective 'vae' trains no UNet"),
    ({"lora.rank": 4, "model.init_from_sd": "sd"}, r"init_from_sd's image channels"),
    ({"lora.rank": 4, "model.preset": "sd15"}, r"config.lora.rank=4 with no config.model."
                                                r"pretrained: .*'sd15' preset's random weights"),
    ({"lora.init_from": "x.safetensors"}, r"config.lora.init_from='x.safetensors' needs "
                                          r"config.lora.rank > 0"),
    ({"lora.rank": 4, "lora.init_from": "missing.safetensors"},
     r"config.lora.init_from='missing.safetensors': no such file"),
])
def test_bad_lora_config_is_named(tmp_path, overrides, message):
  argv = ["--config", SMOKE, "--workdir", str(tmp_path / "run")]
  argv += [f"--config.{key}={value}" for key, value in overrides.items()]
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.parse_command_line(argv)
  assert not os.path.exists(tmp_path / "run")
