"""`--dtype auto` (the default) of `uip2p edit` and `uip2p eval`: bfloat16 on a GPU or TPU,
float32 on a CPU; an explicit dtype is kept."""

import jax
import pytest

from uip2p_jax.cli import build_parser, common

COMMANDS = {
    "edit": ["edit", "--image", "in.png", "--instruction", "add snow", "--out", "out.png"],
    "eval magicbrush": ["eval", "magicbrush", "--data", "d", "--out", "o"],
    "eval ip2p-curve": ["eval", "ip2p-curve", "--data", "d", "--out", "o"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("platform,given,expected", [
    ("cpu", [], "float32"), ("gpu", [], "bfloat16"), ("tpu", [], "bfloat16"),
    ("cpu", ["--dtype", "auto"], "float32"), ("gpu", ["--dtype", "auto"], "bfloat16"),
    ("gpu", ["--dtype", "float32"], "float32"), ("cpu", ["--dtype", "bfloat16"], "bfloat16"),
])
def test_dtype_argument(command, platform, given, expected, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  args = build_parser().parse_args(COMMANDS[command] + given)
  assert args.dtype == expected


def test_this_cpu_defaults_to_float32():
  assert jax.default_backend() == "cpu"
  assert build_parser().parse_args(COMMANDS["edit"]).dtype == "float32"


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_dtype_is_a_usage_error(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    build_parser().parse_args(COMMANDS[command] + ["--dtype", "float16"])
  assert exit_info.value.code == common.USAGE_ERROR
  assert "'float16': expected one of auto, float32, bfloat16" in capsys.readouterr().err


def test_compute_dtype_by_platform():
  assert [common.compute_dtype("auto", p) for p in ("cpu", "gpu", "tpu")] == \
      ["float32", "bfloat16", "bfloat16"]
