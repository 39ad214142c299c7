"""AOT planning: FLOPs and memory of jitted functions on abstract shapes (no weights needed).

Everything here lowers and compiles with `jax.ShapeDtypeStruct` inputs, so the full SD 1.5
models can be costed on a laptop CPU (times in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models import AutoencoderKL, CLIPModel, CLIPTextTransformer, UNet2DConditionModel
from uip2p_jax.models.presets import ModelPreset


@dataclasses.dataclass(frozen=True)
class Cost:
  flops: float  # XLA's count: a multiply-add is 2 FLOPs
  bytes_accessed: float

  @property
  def tflops(self) -> float:
    return self.flops / 1e12


def abstract_split(factory: Callable[[], nnx.Module]):
  """(graphdef, abstract state) of a module, without allocating its parameters."""
  return nnx.split(nnx.eval_shape(factory))


def cost_of(fn: Callable, *abstract_args: Any) -> Cost:
  """XLA's cost analysis of `jax.jit(fn)` on abstract arguments (after optimisation)."""
  analysis = _first(jax.jit(fn).lower(*abstract_args).compile().cost_analysis())
  return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)))


def forward_costs(models: ModelPreset, resolution: int, batch: int = 1,
                  dtype=jnp.float32) -> dict[str, Cost]:
  """Forward FLOPs of each model of a preset for `batch` images at `resolution` px."""
  sds = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
  rngs = lambda: nnx.Rngs(0)
  vae_graph, vae_state = abstract_split(lambda: AutoencoderKL(models.vae, rngs=rngs(),
                                                              dtype=dtype))
  factor = 2 ** (len(models.vae.block_out_channels) - 1)
  latent = resolution // factor
  unet_graph, unet_state = abstract_split(
      lambda: UNet2DConditionModel(models.unet, rngs=rngs(), dtype=dtype))
  text_graph, text_state = abstract_split(
      lambda: CLIPTextTransformer(models.text_encoder, rngs=rngs(), dtype=dtype))
  clip_graph, clip_state = abstract_split(lambda: CLIPModel(models.clip, rngs=rngs(),
                                                            dtype=dtype))
  size = models.clip.vision.image_size
  costs = {
      "unet": cost_of(
          lambda s, x, t, c: nnx.merge(unet_graph, s)(x, t, c), unet_state,
          sds((batch, latent, latent, models.unet.in_channels)), sds((batch,), jnp.int32),
          sds((batch, 77, models.unet.cross_attention_dim))),
      "vae_encoder": cost_of(lambda s, x: nnx.merge(vae_graph, s).encode(x).mean, vae_state,
                             sds((batch, resolution, resolution, 3))),
      "vae_decoder": cost_of(lambda s, z: nnx.merge(vae_graph, s).decode(z), vae_state,
                             sds((batch, latent, latent, models.vae.latent_channels))),
      "clip_vision": cost_of(lambda s, x: nnx.merge(clip_graph, s).get_image_features(x),
                             clip_state, sds((batch, size, size, 3))),
      "text_encoder": cost_of(lambda s, ids: nnx.merge(text_graph, s)(ids)[0], text_state,
                              sds((batch, 77), jnp.int32)),
  }
  return costs


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """What a run holds between steps, whole (before any sharding), from abstract shapes.

  trained: the parameters the optimizer updates (a LoRA run: its factors only); optimizer and
  ema: their optimizer state and EMA; frozen: every parameter the step reads but does not
  update (the VAE, text encoder and loss CLIP, and a LoRA run's base UNet)."""
  trained_count: int
  trained: int
  optimizer: int
  ema: int
  frozen: int

  @property
  def total(self) -> int:
    return self.trained + self.optimizer + self.ema + self.frozen

  def text(self) -> str:
    gib = lambda n: f"{n / 2 ** 30:.2f}"
    return (f"state (whole): trained {self.trained_count / 1e6:.2f} M parameters "
            f"{gib(self.trained)} GiB, optimizer {gib(self.optimizer)} GiB, EMA {gib(self.ema)} GiB, frozen "
            f"{gib(self.frozen)} GiB")


def state_bytes(abstract_state, frozen) -> StateBytes:
  """`StateBytes` of a `train.step.TrainState` of shapes and the frozen parameters' shapes."""
  return StateBytes(sum(int(x.size) for x in jax.tree.leaves(abstract_state.params)),
                    tree_bytes(abstract_state.params), tree_bytes(abstract_state.opt_state),
                    tree_bytes(abstract_state.ema_params), tree_bytes(frozen))


@dataclasses.dataclass(frozen=True)
class StepPlan:
  per_device_bytes: int     # arguments + outputs - donated aliases + temporaries
  argument_bytes: int
  temp_bytes: int
  flops_per_device: float   # XLA's count for one step on one device
  devices: int
  # "compiled": memory and FLOPs of the finished executable. "buffer-assignment": memory from
  # XLA's buffer assignment (read before code generation), FLOPs from the HLO before
  # optimisation (global count / devices).
  source: str = "compiled"
  state: StateBytes | None = None

  @property
  def per_device_gib(self) -> float:
    return self.per_device_bytes / 2 ** 30


@dataclasses.dataclass(frozen=True)
class BufferMemory:
  """Device memory of one program from XLA's buffer assignment (what `memory_analysis` sums)."""
  argument_bytes: int   # entry parameters (donated ones are reused for outputs)
  output_bytes: int     # live-out buffers that are not parameters
  temp_bytes: int       # everything else but constants and thread-local scratch

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+)(.*)$")


def parse_buffer_assignment(text: str) -> BufferMemory:
  """Sums the allocations of an XLA `*-buffer-assignment.txt` dump by kind."""
  argument = output = temp = 0
  found = False
  for line in text.splitlines():
    match = _ALLOCATION.match(line)
    if not match:
      continue
    found = True
    size, kinds = int(match.group(1)), match.group(2)
    if "thread-local:" in kinds or "constant:" in kinds:
      continue  # stack scratch of one kernel; constants are part of the executable
    if re.match(r", parameter \d+,", kinds):
      argument += size
    elif "maybe-live-out" in kinds:
      output += size
    else:
      temp += size
  if not found:
    raise ValueError("no 'allocation N: size S' lines: not an XLA buffer-assignment dump")
  return BufferMemory(argument, output, temp)


def buffer_assignment_memory(lowered, module_name: str, dump_dir: str,
                             poll_s: float = 1.0) -> BufferMemory:
  """Per-device memory of a lowered program from XLA's buffer assignment, without waiting for
  the executable.

  XLA:CPU assigns buffers before generating code, and for a program of SD 1.5's size building
  the executable (LLVM code and the thunk dependency graph, quadratic in the number of kernels)
  takes far longer than everything before it. The compile runs in a daemon thread with XLA's
  text dumps going to `dump_dir`; as soon as the buffer-assignment dump is complete it is read
  and returned. The compile goes on in the background: call this from a process that exits
  afterwards (`uip2p plan` does, and removes `dump_dir`).
  """
  options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True,
             "xla_dump_hlo_module_re": "^" + re.escape(module_name) + "$"}
  outcome: dict[str, Any] = {}

  def compile_in_background():
    try:
      outcome["compiled"] = lowered.compile(compiler_options=options)
    except BaseException as e:  # reported by the waiting thread
      outcome["error"] = e

  threading.Thread(target=compile_in_background, daemon=True, name="plan-compile").start()
  # XLA writes the buffer assignment, its values, the live ranges, then this report: once the
  # report exists the assignment file is complete.
  suffix = f".{module_name}.cpu_after_optimizations-memory-usage-report.txt"
  while True:
    reports = [n for n in os.listdir(dump_dir) if n.endswith(suffix)]
    if reports:
      break
    if "error" in outcome:
      raise outcome["error"]
    if "compiled" in outcome:
      raise RuntimeError(f"XLA compiled {module_name} but wrote no buffer-assignment dump to "
                         f"{dump_dir} (not a CPU backend?)")
    time.sleep(poll_s)
  assignment = os.path.join(dump_dir, reports[0].replace("-memory-usage-report.txt",
                                                         "-buffer-assignment.txt"))
  with open(assignment) as f:
    return parse_buffer_assignment(f.read())


def planned_config(config, global_batch: int, resolution: int, preset: str = "sd15"):
  """A copy of a run's config that builds `preset`'s architecture with abstract weights (no
  checkpoint is read) at `resolution` and `global_batch`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.preset, config.model.pretrained, config.model.init_from_sd = preset, "", ""
    config.lora.init_from = ""  # a LoRA file's factors have the shapes the config gives
    config.data.resolution = resolution
    config.batch_size = global_batch
  return config


def abstract_models(config):
  """(models, graphs, params, frozen) of a planned config: abstract shapes, no weights."""
  from uip2p_jax.model_set import build_models
  from uip2p_jax.train import config as run_config
  from uip2p_jax.train.step import split_models
  models = build_models(**run_config.model_kwargs(config, abstract=True))
  return (models, *split_models(models, config.objective))


def plan_state(config, preset: str = "sd15") -> StateBytes:
  """The whole train state and frozen parameters of a run at `preset` size, from abstract
  shapes only (seconds: nothing is traced or compiled).

  A test helper (tests/test_plan.py checks a run's state accounting with it): `uip2p plan`
  reports `plan_train_step(...).state`, the same `state_bytes` of the same step functions'
  abstract state, which comes with a compile (minutes)."""
  from uip2p_jax import sharding as shd
  from uip2p_jax.train.step import make_step_functions
  config = planned_config(config, config.batch_size, config.data.resolution, preset)
  models, graphs, params, frozen = abstract_models(config)
  functions = make_step_functions(config, graphs, params, frozen, models.schedule,
                                  models.tokenizer, shd.make_mesh(1, 1))
  return state_bytes(functions.abstract_state, frozen)


def plan_train_step(config, data: int, fsdp: int, global_batch: int, resolution: int,
                    preset: str = "sd15", *, dump_dir: str | None = None) -> StepPlan:
  """AOT-compiles the run's train step on abstract shapes (no weights) for a (data, fsdp) mesh.

  `preset` replaces the config's model (and any checkpoint) by an architecture preset: "sd15"
  is the real SD 1.5 / CLIP ViT-L/14 size. Memory comes from XLA's buffer assignment of the
  compiled step on this backend (on CPU: an estimate for accelerators, which fuse and schedule
  differently). With a `dump_dir` (XLA:CPU only) the numbers are taken as soon as buffers are
  assigned (see `buffer_assignment_memory`) and the compile is left running.
  """
  from uip2p_jax import sharding as shd
  from uip2p_jax.train.step import check_batch_size, lower_step
  config = planned_config(config, global_batch, resolution, preset)
  check_batch_size(global_batch, data * fsdp, config.optim.accumulate)
  mesh = shd.make_mesh(data, fsdp)
  models, graphs, params, frozen = abstract_models(config)
  functions, lowered = lower_step(config, graphs, params, frozen, models.schedule,
                                  models.tokenizer, mesh, global_batch)
  state = state_bytes(functions.abstract_state, frozen)
  devices = data * fsdp
  if dump_dir is not None:
    memory = buffer_assignment_memory(lowered, "jit_train_step", dump_dir)
    # Before optimisation the program is the global (unpartitioned) one.
    flops = float(_first(lowered.cost_analysis()).get("flops", 0.0)) / devices
    return StepPlan(memory.total_bytes, memory.argument_bytes, memory.temp_bytes, flops, devices,
                    source="buffer-assignment", state=state)
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return StepPlan(int(per_device), int(memory.argument_size_in_bytes),
                  int(memory.temp_size_in_bytes),
                  float(_first(compiled.cost_analysis()).get("flops", 0.0)), devices,
                  state=state)


def _first(analysis):
  """Older jax returned one cost dict per device."""
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


# ---------------------------------------------------------------------------------------------
# `uip2p plan`: the CPU planning flags, then the plan printed

# Plan on the CPU (when it is the backend, or the accelerators are fewer than the mesh):
# skip LLVM optimisation (buffer assignment, hence memory, is decided before code generation)
# and schedule for memory as accelerator compilers do: XLA:CPU's default schedule runs
# rematerialised forward passes early for parallelism, which at SD 1.5 size triples the peak
# (BENCHMARKS.md, "SD 1.5 size: memory and FLOPs"). The device count flag simulates the mesh's devices.
CPU_PLANNING_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")


def ensure_cpu_planning_flags(devices: int, argv: list[str]) -> bool:
  """True when the plan runs on the CPU; then, unless XLA_FLAGS already hold the planning
  flags for `devices` simulated devices, re-executes `python -m uip2p_jax *argv` with them
  (XLA reads its flags once, when JAX starts) and does not return."""
  import sys
  flags = os.environ.get("XLA_FLAGS", "")
  cpu_flags = (f"--xla_force_host_platform_device_count={devices}", *CPU_PLANNING_FLAGS)
  on_cpu = jax.default_backend() == "cpu" or jax.device_count() < devices
  if on_cpu and not all(flag in flags.split() for flag in cpu_flags):  # run again with them
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([flags, *cpu_flags]))
    os.execve(sys.executable, [sys.executable, "-m", "uip2p_jax", *argv], env)
  return on_cpu


def plan_command(config_spec: str, data: int, fsdp: int, global_batch: int, resolution: int,
                 preset: str = "sd15", *, wait_for_executable: bool = False,
                 argv: list[str] | None = None) -> int:
  """`uip2p plan`: prints per-device memory and FLOPs of a config's train step on a
  (data, fsdp) mesh. `argv`: the command line to re-execute with the CPU planning flags."""
  import shutil
  import sys
  import tempfile
  from uip2p_jax.train.config import load_config
  on_cpu = ensure_cpu_planning_flags(data * fsdp, sys.argv[1:] if argv is None else argv)
  config = load_config(config_spec)
  start = time.perf_counter()
  # On a CPU, building the executable of an SD 1.5-size step takes far longer than assigning
  # its buffers; read the assignment and leave (unless wait_for_executable).
  early = on_cpu and not wait_for_executable
  dump_dir = tempfile.mkdtemp(prefix="uip2p_plan_") if early else None
  try:
    result = plan_train_step(config, data, fsdp, global_batch, resolution, preset,
                             dump_dir=dump_dir)
    how = ("memory from XLA's buffer assignment, FLOPs before optimisation"
           if result.source == "buffer-assignment" else "compiled")
    print(f"uip2p plan: {config_spec} | preset {preset} | mesh data={data},fsdp={fsdp} "
          f"({jax.default_backend()}) | global batch {global_batch} | {resolution} px "
          f"| objective {config.objective} | remat {config.model.remat} "
          f"| {how} in {time.perf_counter() - start:.0f} s")
    print(f"per-device memory: {result.per_device_gib:.2f} GiB "
          f"(arguments {result.argument_bytes / 2 ** 30:.2f} GiB, temporaries "
          f"{result.temp_bytes / 2 ** 30:.2f} GiB)")
    print(f"flops per step: {result.flops_per_device * result.devices / 1e12:.4g} TFLOP "
          f"({result.flops_per_device / 1e12:.4g} TFLOP per device)")
    print(result.state.text())
  finally:
    if dump_dir:
      shutil.rmtree(dump_dir, ignore_errors=True)
  if early:  # the compile still runs in a background thread: do not wait for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  return 0
