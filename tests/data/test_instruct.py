"""`uip2p data instruct` against a loopback OpenAI-compatible server, then `data build` on its
output: validation reasons, bounded retries, resume after a kill, the chain to the builders."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from unittest import mock

import pytest

from llm_server import LoopbackLLM, good_answer
from raw_files import image_struct, jpeg, write_jsonl, write_parquet, write_tar
from uip2p_jax.cli import main
from uip2p_jax.data import builders, instruct

GOOD = [f"a man wearing a denim jacket number {i}" for i in range(6)]
REJECTS = {  # caption: (action, reason)
    "a bowl of soup": ("malformed", "invalid_json"),
    "a red bicycle": ("empty", "empty_field"),
    "a cat on a sofa": ("same", "unchanged_caption"),
    "a house by a lake": ("long", "too_long"),
    "a dog in a park": ("copy", "reverse_copies_forward"),
}
RETRIED = {  # caption: the failing first attempt (the second is good)
    "a busy street": ("429", 1), "a glass of milk": "500", "a snowy mountain": ("slow", 4),
    "a yellow taxi": "drop"}
ALWAYS_FAILS = "a broken server answer"
MAX_RETRIES = 2
COMMON = ["--model", "loopback-model", "--timeout", "2", "--max-retries", str(MAX_RETRIES),
          "--retry-delay", "0.05", "--concurrency", "8", "--no-progress"]


def key_of(caption: str) -> str:
  return "k-" + caption.replace(" ", "-")


def read_lines(path) -> list[dict]:
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def instruct_captions(server, captions_file, out, *extra) -> int:
  return main(["data", "instruct", "captions", "--input", str(captions_file), "--out", str(out),
               "--base-url", server.base_url, *COMMON, *extra])


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
  """One run over every scripted case: (server, captions file, out dir, exit status, stdout)."""
  tmp = tmp_path_factory.mktemp("instruct")
  script = {c: [a] for c, (a, _) in REJECTS.items()}
  script.update({c: [a] for c, a in RETRIED.items()})
  script[ALWAYS_FAILS] = "fail"
  server = LoopbackLLM(script)
  captions = GOOD + list(REJECTS) + list(RETRIED) + [ALWAYS_FAILS]
  captions_file = write_jsonl(str(tmp / "captions.jsonl"),
                              [{"key": key_of(c), "caption": c} for c in captions])
  out = tmp / "out"
  stdout = io.StringIO()
  with mock.patch.dict(os.environ, {"LOOPBACK_KEY": "sk-test"}), redirect_stdout(stdout):
    status = instruct_captions(server, captions_file, out, "--api-key-env", "LOOPBACK_KEY",
                               "--seed", "3", "--temperature", "0.5")
  yield server, captions_file, out, status, stdout.getvalue()
  server.close()


def test_good_and_retried_keys_kept_once_with_provenance(scripted):
  server, _, out, status, stdout = scripted
  kept = read_lines(out / "instructions.jsonl")
  assert sorted(line["key"] for line in kept) == sorted(map(key_of, GOOD + list(RETRIED)))
  prompt = instruct.load_prompt("captions")
  for line in kept:
    caption = line["input_caption"]
    assert line == {"key": key_of(caption), "input_caption": caption,
                    **good_answer(caption, "captions"), "model": "loopback-model",
                    "prompt": "captions_v1", "prompt_sha256": prompt.sha256,
                    "temperature": 0.5, "seed": 3}
  body = server.requests[0][2]
  assert body["response_format"] == {"type": "json_object"}
  assert (body["model"], body["seed"], body["temperature"]) == ("loopback-model", 3, 0.5)
  assert body["messages"] == [{"role": "user", "content": prompt.text + json.dumps(
      {"caption": server.requests[0][0]})}]
  assert server.authorizations == {"Bearer sk-test"}
  assert status == 3 and "10 kept, 5 rejected" in stdout and "1 failed" in stdout


def test_bad_answers_rejected_with_their_reason(scripted):
  _, _, out, _, stdout = scripted
  rejected = {line["key"]: line for line in read_lines(out / "rejected.jsonl")}
  assert sorted(rejected) == sorted(map(key_of, REJECTS))
  for caption, (action, reason) in REJECTS.items():
    line = rejected[key_of(caption)]
    assert line["reason"] == reason and line["mode"] == "captions"
    assert isinstance(line["raw"], str) and line["prompt_sha256"]
  assert rejected[key_of("a bowl of soup")]["raw"] == "{not json"
  assert "too_long" in stdout and "edited_caption has 102 CLIP tokens" in \
      rejected[key_of("a house by a lake")]["detail"]


def test_retries_happen_and_are_bounded(scripted):
  server, _, _, _, stdout = scripted
  for caption in GOOD + list(REJECTS):
    assert server.attempts(caption) == 1, caption
  for caption in RETRIED:
    assert server.attempts(caption) == 2, caption
  assert server.attempts(ALWAYS_FAILS) == MAX_RETRIES + 1
  first, second = server.times("a busy street")
  assert second - first >= 0.95  # waited its Retry-After: 1
  assert f"failed {key_of(ALWAYS_FAILS)}: HTTP 503" in stdout


def test_rerun_sends_only_unfinished_keys_and_retry_rejected_resends(scripted, tmp_path):
  server, captions_file, out, _, _ = scripted
  out2 = tmp_path / "out"
  shutil.copytree(out, out2)
  before = {c: server.attempts(c) for c in GOOD + list(REJECTS) + list(RETRIED)}
  assert instruct_captions(server, captions_file, out2) == 3   # the failing key fails again
  assert {c: server.attempts(c) for c in before} == before     # nothing else was sent
  assert server.attempts(ALWAYS_FAILS) == 2 * (MAX_RETRIES + 1)
  server.script[ALWAYS_FAILS] = []                              # the server recovers
  assert instruct_captions(server, captions_file, out2, "--retry-rejected") == 0
  for caption in REJECTS:                                       # sent again: now good
    assert server.attempts(caption) == 2
  kept = [line["key"] for line in read_lines(out2 / "instructions.jsonl")]
  assert sorted(kept) == sorted(map(key_of, GOOD + list(RETRIED) + list(REJECTS)
                                    + [ALWAYS_FAILS]))


def test_killed_run_resumes_to_the_same_lines(tmp_path):
  captions = [f"a photo of a lighthouse number {i}" for i in range(12)]
  captions_file = write_jsonl(str(tmp_path / "c.jsonl"),
                              [{"key": key_of(c), "caption": c} for c in captions])
  server = LoopbackLLM(default=("slow", 0.1))
  try:
    assert instruct_captions(server, captions_file, tmp_path / "full") == 0
    full = open(tmp_path / "full" / "instructions.jsonl").read().splitlines(keepends=True)
    # A kill between two writes: N whole lines and half of the next.
    (tmp_path / "cut").mkdir()
    with open(tmp_path / "cut" / "instructions.jsonl", "w") as f:
      f.write("".join(full[:5]) + full[5][:len(full[5]) // 2])
    assert instruct_captions(server, captions_file, tmp_path / "cut") == 0
    resumed = open(tmp_path / "cut" / "instructions.jsonl").read().splitlines(keepends=True)
    assert sorted(resumed) == sorted(full) and len(resumed) == 12
    assert all(server.attempts(c) == (1 if f'"{key_of(c)}"' in "".join(full[:5]) else 2)
               for c in captions)
    # A real SIGKILL mid-run (a process of its own), then the same command again.
    args = [sys.executable, "-m", "uip2p_jax", "data", "instruct", "captions", "--input",
            captions_file, "--out", str(tmp_path / "killed"), "--base-url", server.base_url,
            *COMMON, "--concurrency", "2"]
    server.default = ("slow", 0.3)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out_file = tmp_path / "killed" / "instructions.jsonl"
    deadline = time.monotonic() + 30
    while len(read_lines(out_file)) < 3 and time.monotonic() < deadline:
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= len(read_lines(out_file)) < 12
    server.default = "good"
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert sorted(open(out_file).read().splitlines(keepends=True)) == sorted(full)
    # Ctrl-C: status 75, whole lines only. Answers 1 s apart leave the 10 keys after the second
    # line several seconds of run for the signal to land in (0.3 s once let the run finish first).
    server.default = ("slow", 1.0)
    args[args.index(str(tmp_path / "killed"))] = str(tmp_path / "interrupted")
    # SIGINT at its default in the child: a suite started in the background by a shell (CI, a
    # `&` job) ignores it, the child would inherit that, and Python keeps an ignored SIGINT.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out_file = tmp_path / "interrupted" / "instructions.jsonl"
    deadline = time.monotonic() + 60
    while len(read_lines(out_file)) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert len(read_lines(out_file)) >= 2, "the run wrote no 2 lines within 60 s"
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 75 and "interrupted (Ctrl-C)" in stdout
    assert 2 <= len(read_lines(out_file)) < 12 and open(out_file).read().endswith("\n")
  finally:
    server.close()


def test_dead_server_stops_the_run_early(tmp_path, capsys):
  captions_file = write_jsonl(str(tmp_path / "c.jsonl"),
                              [{"key": str(i), "caption": f"a tree {i}"} for i in range(100)])
  server = LoopbackLLM(default="fail")
  try:
    assert instruct_captions(server, captions_file, tmp_path / "out", "--max-retries", "0",
                             "--concurrency", "2") == 3
    assert 20 <= len(server.requests) < 30
  finally:
    server.close()
  assert "stopped early: 20 keys in a row got no answer" in capsys.readouterr().out


def test_chain_instruct_then_build_captions_from_shards(tmp_path, step_setup):
  """instruct (loopback LLM) -> data build captions -> the grain loader -> one CEC step."""
  shards = tmp_path / "shards"
  shards.mkdir()
  captions = {f"{i:09d}": f"a red barn in a field number {i}" for i in range(6)}
  keys = list(captions)
  write_tar(str(shards / "00000.tar"), {k: {"jpg": jpeg(i), "txt": captions[k].encode()}
                                        for i, k in enumerate(keys[:3])})
  write_tar(str(shards / "00001.tar"), {k: {"jpg": jpeg(i), "json": json.dumps(
      {"caption": captions[k]}).encode()} for i, k in enumerate(keys[3:])})
  pattern = str(shards / "{00000..00001}.tar")
  server = LoopbackLLM()
  try:
    assert main(["data", "instruct", "captions", "--webdataset", pattern, "--out",
                 str(tmp_path / "out"), "--base-url", server.base_url, *COMMON]) == 0
  finally:
    server.close()
  assert main(["data", "build", "captions", "--webdataset", pattern, "--instructions",
               str(tmp_path / "out" / "instructions.jsonl"), "--out",
               str(tmp_path / "data")]) == 0
  source, _ = builders.open_split(str(tmp_path / "data"), "captions")
  records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == keys
  for key, caption in captions.items():
    assert records[key]["input_caption"].decode() == caption
    assert records[key]["edited_caption"].decode() == f"{caption} in the snow"
    assert records[key]["reverse_instruction"] == b"melt the snow"

  # The loader yields them, and the session's compiled tiny CEC step (32 px, batch 8) trains.
  import jax
  import numpy as np
  from uip2p_jax import sharding
  from uip2p_jax.data.loader import Loader, LoaderConfig
  from uip2p_jax.train.step import batch_fields
  host = next(Loader(LoaderConfig(str(tmp_path / "data"), batch_size=8, resolution=32,
                                  num_workers=0)))
  assert {row.decode() for row in host["id"]} <= set(keys)
  functions, params, frozen, _ = step_setup
  batch = sharding.global_batch(host, functions.batch_sharding, batch_fields("cec"))
  state, metrics = functions.step(functions.init_state(params, seed=0), frozen, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  assert int(jax.device_get(state.step)) == 1


def test_chain_reverse_then_build_ip2p(tmp_path):
  n = 3
  triples = [(f"a cabin in the woods {i}", f"make it night {i}", f"a cabin in the woods at "
              f"night {i}") for i in range(n)]
  parquet = write_parquet(str(tmp_path / "part-0.parquet"), {
      "original_prompt": [t[0] for t in triples], "edit_prompt": [t[1] for t in triples],
      "edited_prompt": [t[2] for t in triples],
      "original_image": [image_struct(jpeg(i)) for i in range(n)],
      "edited_image": [image_struct(jpeg(10 + i)) for i in range(n)]})
  server = LoopbackLLM()
  try:
    assert main(["data", "instruct", "reverse", "--input", parquet, "--out",
                 str(tmp_path / "out"), "--base-url", server.base_url, *COMMON]) == 0
  finally:
    server.close()
  lines = read_lines(tmp_path / "out" / "reverse_instructions.jsonl")
  assert sorted(line["id"] for line in lines) == [f"part-0-{i:06d}" for i in range(n)]
  assert main(["data", "build", "ip2p", "--parquet", parquet, "--reverse-instructions",
               str(tmp_path / "out" / "reverse_instructions.jsonl"), "--out",
               str(tmp_path / "data")]) == 0
  source, _ = builders.open_split(str(tmp_path / "data"), "ip2p")
  records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
  for i, (input_caption, _, _) in enumerate(triples):
    assert records[f"part-0-{i:06d}"]["reverse_instruction"].decode() == \
        f"undo the edit of {input_caption}"


def test_parquet_input_shards_and_bad_inputs(tmp_path):
  keys = [f"img{i}" for i in range(10)] + ["", "img0"]  # an empty key, a duplicate
  texts = [f"a blue boat number {i}" for i in range(10)] + ["no key", "duplicate"]
  parquet = write_parquet(str(tmp_path / "c.parquet"), {"k": keys, "text": texts})
  server = LoopbackLLM()
  try:
    statuses = [main(["data", "instruct", "captions", "--input", parquet, "--caption-column",
                      "text", "--key-column", "k", "--out", str(tmp_path / "out"),
                      "--num-shards", "2", "--shard", str(s), "--base-url", server.base_url,
                      *COMMON]) for s in (0, 1)]
  finally:
    server.close()
  shard_keys = [[line["key"] for line in read_lines(
      instruct.output_paths(str(tmp_path / "out"), "captions", 2, s)[0])] for s in (0, 1)]
  assert sorted(shard_keys[0] + shard_keys[1]) == keys[:10] and all(shard_keys)
  assert all(instruct.in_shard(k, 2, s) for s in (0, 1) for k in shard_keys[s])
  assert 3 in statuses  # the empty key (every shard) and the duplicate (its shard) reported


def test_wrong_key_stops_the_run_with_status_2(tmp_path, capsys):
  captions_file = write_jsonl(str(tmp_path / "c.jsonl"), [{"key": "a", "caption": "a tree"}])
  server = LoopbackLLM(default="401")
  try:
    assert instruct_captions(server, captions_file, tmp_path / "out") == 2
    assert server.attempts("a tree") == 1
  finally:
    server.close()
  assert "HTTP 401" in capsys.readouterr().err


def test_validation_reasons():
  item = instruct.Item("k", "x:1", {"input_caption": "A man wearing a denim jacket"})
  good = {"instruction": "make the jacket a rain coat", "edited_caption": "A man wearing a rain "
          "coat", "reverse_instruction": "make the coat a denim jacket"}
  assert instruct.validate_answer("captions", item, "```json\n" + json.dumps(good) + "\n```") \
      == good

  def reason(answer):
    with pytest.raises(instruct.Rejected) as info:
      instruct.validate_answer("captions", item, answer if isinstance(answer, str)
                               else json.dumps(answer))
    return info.value.reason
  assert reason("not json") == "invalid_json"
  assert reason([good]) == "not_an_object"
  assert reason({**good, "instruction": None}) == "empty_field"
  assert reason({**good, "reverse_instruction": 3}) == "empty_field"
  assert reason({**good, "edited_caption": "a man  wearing a DENIM jacket"}) == \
      "unchanged_caption"
  assert reason({**good, "instruction": "x " * 76}) == "too_long"
  instruct.validate_answer("captions", item, json.dumps({**good, "instruction": "x " * 75}))
  assert reason({**good, "reverse_instruction": "Make the jacket a rain coat"}) == \
      "reverse_copies_forward"
  triple = instruct.Item("k", "x:1", {"input_caption": "a", "instruction": "make it red",
                                      "edited_caption": "b"})
  with pytest.raises(instruct.Rejected, match="reverse_copies_forward"):
    instruct.validate_answer("reverse", triple, '{"reverse_instruction": "make it red"}')


def test_usage_errors_exit_2_before_anything_is_written(tmp_path, capsys):
  captions_file = write_jsonl(str(tmp_path / "c.jsonl"), [{"key": "a", "caption": "a tree"}])
  parquet = write_parquet(str(tmp_path / "c.parquet"), {"text": ["a tree"]})
  base = ["--out", str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9/v1", *COMMON]
  cases = {
      "exactly one of --input": ["captions", "--input", captions_file, "--webdataset", "x.tar"],
      "needs --caption-column": ["captions", "--input", parquet],
      "no input files match": ["captions", "--input", str(tmp_path / "none.jsonl")],
      "missing columns": ["reverse", "--input", parquet],
      "--shard 2 is not in 0..1": ["captions", "--input", captions_file, "--num-shards", "2",
                                   "--shard", "2"],
      "no such environment variable": ["captions", "--input", captions_file, "--api-key-env",
                                       "UIP2P_TEST_UNSET_VARIABLE"],
  }
  for message, args in cases.items():
    assert main(["data", "instruct", *args, *base]) == 2, message
    assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  # The output is appended to line by line: a bucket URL is refused, not written into ./gs:.
  with pytest.raises(SystemExit) as exit_info:
    main(["data", "instruct", "captions", "--input", captions_file, "--out", "gs://b/out",
          *base[2:]])
  assert exit_info.value.code == 2
  assert "'gs://b/out': this output must be a local path" in capsys.readouterr().err
  assert not os.path.exists("gs:")
