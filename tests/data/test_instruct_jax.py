"""`uip2p data instruct --backend jax`: the in-process Gemma 2 on a tiny random model with a
tiny tokenizer (tests/conftest.py: tiny_gemma). Its answers are noise, so they are rejected;
the path around them (batching, padding, sampling, validation, the lines, resume) is what runs.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from raw_files import write_jsonl
from uip2p_jax.cli import main
from uip2p_jax.data import instruct

CAPTIONS = [f"a red barn in a field number {i}" for i in range(6)]
TOO_LONG = "a very long caption " * 400  # its prompt exceeds the model's 2048 positions
# batch 4: the 6 captions make one full batch and one of 2 (padded to 4); 24 new tokens.
JAX = ["--backend", "jax", "--batch-size", "4", "--max-new-tokens", "24", "--seed", "5",
       "--temperature", "0.7", "--no-progress"]


def read_lines(path):
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def captions_file(tmp_path):
  return write_jsonl(str(tmp_path / "captions.jsonl"), [
      {"key": f"k{i}", "caption": c} for i, c in enumerate(CAPTIONS + [TOO_LONG])])


@pytest.fixture(scope="module")
def jax_run(tiny_gemma, tmp_path_factory):
  """One CLI run on this process's device(s): (input file, out dir, exit status)."""
  tmp = tmp_path_factory.mktemp("instruct_jax")
  source = captions_file(tmp)
  status = main(["data", "instruct", "captions", "--input", source, "--out", str(tmp / "out"),
                 "--model", tiny_gemma[1], *JAX])
  return source, tmp / "out", status


def test_jax_backend_writes_validated_lines_and_resumes(jax_run, tiny_gemma, capsys):
  source, out, status = jax_run
  assert status == 0
  kept, rejected = read_lines(out / "instructions.jsonl"), read_lines(out / "rejected.jsonl")
  assert sorted(line.get("key") for line in kept + rejected) == [f"k{i}" for i in range(7)]
  assert len(rejected) >= 5  # a random model writes no valid JSON
  by_key = {line["key"]: line for line in rejected}
  assert by_key["k6"]["reason"] == "refused"
  assert "exceed the model's 2048 positions" in by_key["k6"]["detail"]
  prompt = instruct.load_prompt("captions")
  for line in kept + rejected:
    assert line["model"].startswith(os.path.abspath(tiny_gemma[1]) + " (weights ")
    assert (line["prompt_sha256"], line["temperature"], line["seed"]) == (prompt.sha256, 0.7, 5)
  answered = [line for line in rejected if line["reason"] != "refused"]
  assert answered and all(isinstance(line["raw"], str) for line in answered)
  # A rerun finds every key done.
  capsys.readouterr()
  assert main(["data", "instruct", "captions", "--input", source, "--out", str(out),
               "--model", tiny_gemma[1], *JAX]) == 0
  assert "7 already done" in capsys.readouterr().out
  assert len(read_lines(out / "rejected.jsonl")) == len(rejected)


def test_jax_backend_resumed_run_writes_the_same_lines(jax_run, tiny_gemma, tmp_path):
  """A run killed after 3 lines, resumed: the keys left make another batch (k3-k5, not k0-k3
  and k4-k5), and each key still samples what it sampled (its own key)."""
  source, out, _ = jax_run
  full = {name: (out / name).read_text().splitlines(keepends=True) if (out / name).exists()
          else [] for name in ("instructions.jsonl", "rejected.jsonl")}
  assert [json.loads(line)["key"] for line in full["rejected.jsonl"][:3]] == ["k0", "k1", "k2"]
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "rejected.jsonl").write_text("".join(full["rejected.jsonl"][:3]))
  assert main(["data", "instruct", "captions", "--input", source, "--out",
               str(tmp_path / "out"), "--model", tiny_gemma[1], *JAX]) == 0
  for name, lines in full.items():
    resumed = tmp_path / "out" / name
    assert sorted(resumed.read_text().splitlines(keepends=True) if resumed.exists()
                  else []) == sorted(lines), name


def test_generation_stops_at_a_stop_token(jax_run, tiny_gemma):
  """Every token a stop token: each row ends at its first, which its answer leaves out."""
  from uip2p_jax.data.jax_llm import GemmaGenerator, JaxConfig
  generator = GemmaGenerator(JaxConfig(model=tiny_gemma[1], batch_size=4, max_new_tokens=24,
                                       temperature=0.7, seed=5))  # the CLI run's compiled shape
  prompt = instruct.load_prompt("captions")
  prompts = [generator.encode(instruct.user_message("captions", instruct.Item(
      f"k{i}", "", {"input_caption": c}), prompt)) for i, c in enumerate(CAPTIONS[:2])]
  answers = generator.generate(["k0", "k1"], prompts)
  assert [a.completion_tokens for a in answers] == [24, 24]  # a random model never stops
  generator.is_stop[:] = True  # (the same compiled program: the mask's shape is the vocab's)
  answers = generator.generate(["k0", "k1"], prompts)
  assert [(a.content, a.completion_tokens) for a in answers] == [("", 1), ("", 1)]


# google/gemma-2-2b-it's chat template (its tokenizer_config.json), as transformers renders it.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user')"
    " != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ "
    "'<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def test_prompts_are_gemma_chat_turns(tiny_gemma):
  """Our tokens of a message = transformers' GemmaTokenizer on Gemma's chat template."""
  from transformers import AutoTokenizer

  from uip2p_jax.data.jax_llm import GemmaGenerator, JaxConfig
  generator = GemmaGenerator(JaxConfig(model=tiny_gemma[1]))
  tokenizer = AutoTokenizer.from_pretrained(tiny_gemma[1])
  item = instruct.Item("k", "x:1", {"input_caption": "  a café at night "})
  message = instruct.user_message("captions", item, instruct.load_prompt("captions"))
  text = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                       chat_template=GEMMA2_CHAT_TEMPLATE,
                                       add_generation_prompt=True, tokenize=False)
  assert text.startswith("<bos><start_of_turn>user\nYou write")
  assert text.endswith('night "}<end_of_turn>\n<start_of_turn>model\n')
  assert generator.encode(message) == tokenizer(text, add_special_tokens=False)["input_ids"]


SCRIPT = textwrap.dedent("""
    import sys, jax
    from uip2p_jax.cli import main
    assert jax.device_count() == 2, jax.devices()
    sys.exit(main(sys.argv[1:]))
""")


def test_jax_backend_on_two_devices_writes_the_one_device_lines(jax_run, tiny_gemma, tmp_path):
  source, out, _ = jax_run
  assert jax.device_count() == 1, "the reference run is the test process's, on one device"
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT, "data", "instruct", "captions", "--input", source, "--out",
       str(tmp_path / "out"), "--model", tiny_gemma[1], *JAX],
      env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("instructions.jsonl", "rejected.jsonl"):
    two = (tmp_path / "out" / name).read_text() if (tmp_path / "out" / name).exists() else ""
    one = (out / name).read_text() if (out / name).exists() else ""
    assert two == one, name


def test_jax_backend_usage_errors(tiny_gemma, tmp_path, capsys):
  source = captions_file(tmp_path)
  base = ["data", "instruct", "captions", "--input", source, "--out", str(tmp_path / "out")]
  cases = {
      "no such folder": ["--backend", "jax", "--model", str(tmp_path / "absent")],
      "--base-url: not an option of --backend jax": [
          "--backend", "jax", "--model", tiny_gemma[1], "--base-url", "http://x/v1"],
      "--batch-size: not an option of --backend openai": [
          "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--batch-size", "2"],
      "--backend openai needs --base-url": ["--model", "m"],
  }
  for message, args in cases.items():
    assert main([*base, *args]) == 2, message
    assert message in capsys.readouterr().err
  tokenizer_less = tmp_path / "no_tokenizer"
  tokenizer_less.mkdir()
  for name in ("config.json", "model.safetensors"):
    os.link(os.path.join(tiny_gemma[1], name), tokenizer_less / name)
  assert main([*base, "--backend", "jax", "--model", str(tokenizer_less)]) == 2
  assert "no tokenizer.json" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
