"""`uip2p plan`: memory from XLA's buffer-assignment dump equals `memory_analysis`; the command."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from uip2p_jax.plan import buffer_assignment_memory, parse_buffer_assignment

REPO = pathlib.Path(__file__).resolve().parents[1]


def _update(params, batch):
  """A donated parameter update with a scalar and a fresh array out, and temporaries."""
  hidden = jnp.tanh(batch @ params["w"])
  loss = (hidden @ params["v"]).mean()
  new = {"w": params["w"] - 1e-3 * batch.T @ hidden, "v": params["v"] * 0.5}
  return new, loss, hidden.sum(0)


def test_buffer_assignment_dump_matches_memory_analysis(tmp_path):
  params = {"w": jax.ShapeDtypeStruct((96, 128), jnp.float32),
            "v": jax.ShapeDtypeStruct((128, 8), jnp.float32)}
  batch = jax.ShapeDtypeStruct((32, 96), jnp.float32)
  lowered = jax.jit(_update, donate_argnums=0).lower(params, batch)
  memory = buffer_assignment_memory(lowered, "jit__update", str(tmp_path))
  reference = lowered.compile().memory_analysis()
  assert memory.argument_bytes == reference.argument_size_in_bytes == (96 * 128 + 128 * 8
                                                                       + 32 * 96) * 4
  assert memory.temp_bytes == reference.temp_size_in_bytes > 0
  assert memory.total_bytes == (reference.argument_size_in_bytes
                                + reference.output_size_in_bytes
                                - reference.alias_size_in_bytes
                                + reference.temp_size_in_bytes)


def test_parse_refuses_other_text():
  with pytest.raises(ValueError, match="buffer-assignment"):
    parse_buffer_assignment("HloModule jit_f\nENTRY main {}\n")


def test_plan_command_prints_memory_and_flops(tmp_path):
  """`uip2p plan` on 2 simulated devices: both lines, and no dump left behind."""
  env = dict(os.environ, TMPDIR=str(tmp_path))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "uip2p_jax", "plan", "--config", "experiments/ip2p_supervised.py",
       "--preset", "tiny", "--mesh", "data=1,fsdp=2", "--global-batch", "8",
       "--resolution", "32"], env=env, capture_output=True, text=True, timeout=600,
      cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  memory = re.search(r"^per-device memory: ([\d.]+) GiB", result.stdout, re.M)
  flops = re.search(r"^flops per step: ([\d.e+-]+) TFLOP", result.stdout, re.M)
  assert memory and flops, result.stdout
  assert float(memory.group(1)) > 0 and float(flops.group(1)) > 0
  assert "mesh data=1,fsdp=2 (cpu)" in result.stdout
  assert re.search(r"^state \(whole\): trained [\d.]+ M parameters", result.stdout, re.M)
  assert not list(tmp_path.glob("uip2p_plan_*"))


def test_attention_resolution_the_unet_lacks_is_named(tmp_path):
  """Found while planning at a small size: L_attn with no layer at its resolution (traced only)."""
  from trainer_setup import tiny_config
  from uip2p_jax.plan import plan_train_step
  config = tiny_config(**{"cycle.attention_select": "resolution",
                          "cycle.attention_resolution": 3})
  with pytest.raises(ValueError, match=r"cycle.attention_resolution=3: no cross-attention layer"):
    plan_train_step(config, 1, 1, 8, 32,
                    preset="tiny", dump_dir=str(tmp_path))


@pytest.mark.parametrize("spec", ["experiments/finetune.py:method=lora",
                                  "experiments/finetune.py:method=full"])
def test_finetune_state_of_lora_holds_only_the_factors(spec):
  """The planned state of a LoRA run trains, optimises and averages the factors only, its base
  UNet frozen; a full run's holds the whole UNet, its EMA in bfloat16 (abstract shapes of the
  tiny preset: nothing is traced or compiled)."""
  from flax import nnx
  from uip2p_jax.models.lora import LoRAParam
  from uip2p_jax.plan import abstract_models, plan_state, planned_config, tree_bytes
  from uip2p_jax.train import config as run_config
  config = run_config.load_config(str(REPO / spec))
  run_config.check(config)
  state = plan_state(config, preset="tiny")
  models, _, params, frozen = abstract_models(planned_config(config, 2, 64, "tiny"))
  unet_bytes = tree_bytes(nnx.state(models.unet))
  if config.lora.rank:
    factors = nnx.state(models.unet, LoRAParam)
    assert state.trained == tree_bytes(factors) == tree_bytes(params) > 0
    assert state.trained_count == sum(x.size for x in jax.tree.leaves(factors))
    # AdamW: two float32 moments per factor (+ a step count); the EMA: one float32 copy.
    assert 2 * state.trained <= state.optimizer < 2 * state.trained + 1024
    assert state.ema == state.trained
    assert state.frozen == tree_bytes(frozen) > unet_bytes - state.trained  # base UNet frozen
  else:
    assert state.trained == unet_bytes and state.ema == unet_bytes // 2   # bfloat16 EMA


def test_finetune_variants_load_and_pass_the_run_checks():
  """The one-device targets' configs (the three `uip2p plan` commands of BENCHMARKS.md) and
  fine-tuning the released checkpoint on your own pairs."""
  from uip2p_jax.train import config as run_config
  for arg in ("method=lora", "method=full", "method=lora,objective=cec", "method=full,optim=adamw"):
    run_config.check(run_config.load_config(str(REPO / "experiments/finetune.py") + ":" + arg))
  config = run_config.load_config(
      str(REPO / "experiments/finetune.py") + ":data=data/mine,init=timbrooks/instruct-pix2pix")
  run_config.check(config)
  assert (config.model.pretrained, config.data.dir, config.data.kind) == (
      "timbrooks/instruct-pix2pix", "data/mine", "ip2p")
  with pytest.raises(run_config.ConfigError, match="method='half'"):
    run_config.load_config(str(REPO / "experiments/finetune.py") + ":method=half")
