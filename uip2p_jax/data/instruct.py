"""The texts of a training record written by an LLM: `uip2p data instruct` (docs/method.md sec. 2).

* ``captions``: a caption -> forward instruction, edited caption, reverse instruction (the paper
  used Gemma 2 for CC3M/CC12M). Input: JSONL ``{"key", "caption"}``, parquet (a caption column,
  optionally a key column; else ids ``<file stem>-<row, 6 digits>``) or img2dataset webdataset
  shards (each sample's ``.txt``, else its ``.json`` caption). Output ``instructions.jsonl``:
  ``key``, ``input_caption``, ``instruction``, ``edited_caption``, ``reverse_instruction``, what
  ``data build captions --webdataset --instructions`` joins by key.
* ``reverse``: an IP2P triple -> reverse instruction (the paper used Gemini Pro). Input: the
  parquet files of ``timbrooks/instructpix2pix-clip-filtered`` (text columns only). Output
  ``reverse_instructions.jsonl``: ``id`` (``<file stem>-<row, 6 digits>``, the id
  ``data build ip2p`` gives the row), the triple and ``reverse_instruction``, what
  ``data build ip2p --reverse-instructions`` joins by id.

Each kept line also records ``model``, ``prompt`` (the prompt file's name), ``prompt_sha256``,
``temperature`` and ``seed``. The prompts are versioned files in ``prompts/``: the task with
few-shot examples, then the input as one JSON object, all in one user message (no system
message: some chat templates, Gemma's among them, refuse one); the answer is asked for as one
JSON object (``response_format={"type": "json_object"}``).

Backend ``openai``: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, Ollama, a
hosted API), through aiohttp (connection pooling, keep-alive and TLS that the standard library
offers only synchronously): ``concurrency`` requests in flight; 429 (waiting its Retry-After),
408, 5xx, timeouts and dropped connections are retried with exponential backoff and jitter, at
most ``max_retries`` times; 401/403/404 (a wrong key, model or URL) stop the run; another 4xx
refuses that input (rejected as ``refused``).

Backend ``jax`` (``JaxConfig``): Gemma 2 in this process (uip2p_jax/data/jax_llm.py, our Flax
model in uip2p_jax/models/gemma.py), on this host's devices, no server: the prompts in Gemma's
chat turns, ``batch_size`` at a time, the batch split over the devices; each input samples
with its own key (from ``seed`` and its key), so its answer does not depend on its batch (up
to float rounding). No JSON mode here: the prompt asks for JSON and validation rejects the
rest. A prompt too long for the model's positions is rejected as ``refused``. ``model`` records the
folder with a fingerprint of its weight files, or the repo id with its snapshot's commit.

Answers are validated (``validate_answer``); a failing answer goes to ``rejected.jsonl`` with the
reason, a detail and the raw answer. Outputs are append-only: each line is one ``write`` on an
unbuffered file, so a killed run loses at most its in-flight requests; a rerun drops a half-
written last line, skips keys already kept or rejected (``retry_rejected`` sends rejects again)
and sends the rest. ``num_shards``/``shard`` split the input by a stable hash of the key (one
process or host per shard; each shard writes its own files, ``*-SSSSS-of-NNNNN.jsonl``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator

from uip2p_jax.data import sources
from uip2p_jax.data.jax_llm import JaxConfig
from uip2p_jax.data.llm_client import (ClientConfig, Refused, ServerError, Unanswered,
                                        chat_completion)

MAX_CLIP_TOKENS = 77  # BOS + text + EOS: what the text encoder sees
PROMPT_DIR = os.path.join(os.path.dirname(__file__), "prompts")
REJECT_REASONS = ("invalid_json", "not_an_object", "empty_field", "unchanged_caption", "too_long",
                  "reverse_copies_forward", "refused")


@dataclasses.dataclass(frozen=True)
class Mode:
  prompt: str                    # default prompt file in PROMPT_DIR
  answer_fields: tuple[str, ...]  # the fields of the model's JSON answer
  output: str                    # kept lines
  key_field: str                 # the join key of an output line


MODES = {
    "captions": Mode("captions_v1.txt", ("instruction", "edited_caption", "reverse_instruction"),
                     "instructions.jsonl", "key"),
    "reverse": Mode("reverse_v1.txt", ("reverse_instruction",), "reverse_instructions.jsonl", "id"),
}
IP2P_TEXT_COLUMNS = {"input_caption": "original_prompt", "instruction": "edit_prompt",
                     "edited_caption": "edited_prompt"}  # as sources.ip2p_records reads them


@dataclasses.dataclass(frozen=True)
class Item:
  """One input record: its key, where it came from (``FILE:LINE``, ``FILE:row N``,
  ``SHARD:KEY``) and its texts (``input_caption``; reverse mode also ``instruction`` and
  ``edited_caption``)."""
  key: str
  where: str
  texts: dict


@dataclasses.dataclass(frozen=True)
class BadInput:
  """An input record that cannot be sent (no key, an empty caption, a duplicate key...)."""
  key: str | None
  where: str
  reason: str


# ---------------------------------------------------------------------------------------------
# Inputs: each checks its files when called, then yields Item | BadInput.

def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _nonempty(value) -> str:
  return value.strip() if isinstance(value, str) else ""


def _jsonl_captions(files: list[str]) -> Iterator[Item | BadInput]:
  for path in files:
    name = os.path.basename(path)
    for number, obj, raw in sources.read_jsonl(path):
      where = f"{name}:{number}"
      if obj is None:
        yield BadInput(None, where, sources.jsonl_error(raw))
        continue
      key = obj.get("key")
      if not isinstance(key, (str, int)) or isinstance(key, bool) or str(key) == "":
        yield BadInput(None, where, "no 'key' field (a string or integer)")
        continue
      caption = _nonempty(obj.get("caption"))
      yield (Item(str(key), where, {"input_caption": caption}) if caption
             else BadInput(str(key), where, "'caption' is missing or empty"))


def _parquet_captions(files: list[str], caption_column: str, key_column: str | None
                      ) -> Iterator[Item | BadInput]:
  columns = [caption_column] + ([key_column] if key_column else [])
  for path, row, values in sources._parquet_rows(files, columns):
    key = str(values[key_column]) if key_column else f"{_stem(path)}-{row:06d}"
    where = f"{path}:row {row}"
    if key_column and values[key_column] in (None, ""):
      yield BadInput(None, where, f"column {key_column!r} is empty")
      continue
    caption = _nonempty(values[caption_column])
    yield (Item(key, where, {"input_caption": caption}) if caption
           else BadInput(key, where, f"column {caption_column!r} is missing or empty"))


def _webdataset_captions(files: list[str]) -> Iterator[Item | BadInput]:
  import tarfile
  for shard in files:
    try:
      # Reads only the text members: the images are skipped over, not read.
      for key, sample in sources._tar_samples(shard, extensions=("txt", "json")):
        short_key, where = os.path.basename(key), f"{shard}:{key}"
        caption = _nonempty(sources.sample_caption(sample))
        yield (Item(short_key, where, {"input_caption": caption}) if caption
               else BadInput(short_key, where, "no caption (.txt or .json) in the sample"))
    except (tarfile.TarError, OSError, EOFError) as e:
      yield BadInput(None, shard, f"unreadable shard ({e})")


def caption_items(input_pattern: str | None = None, webdataset: str | None = None,
                  caption_column: str | None = None, key_column: str | None = None
                  ) -> tuple[Iterator[Item | BadInput], int | None]:
  """(the captions-mode input records, their number when known cheaply, else None).

  ``input_pattern``: JSONL files (``{"key", "caption"}`` lines) or parquet files (with
  ``caption_column``), told apart by extension; ``webdataset``: img2dataset tar shards.
  """
  if bool(input_pattern) == bool(webdataset):
    raise ValueError("captions: give exactly one of --input (JSONL or parquet) or --webdataset")
  if webdataset:
    return _webdataset_captions(sources._files(webdataset, "webdataset shard")), None
  files = sources._files(input_pattern, "input")
  kinds = {os.path.splitext(f)[1].lower() for f in files}
  if kinds == {".jsonl"}:
    if caption_column or key_column:
      raise ValueError("--caption-column / --key-column are for parquet input; JSONL lines "
                       "carry 'key' and 'caption'")
    total = 0
    for path in files:
      with open(path, "rb") as f:
        total += sum(1 for line in f if line.strip())
    return _jsonl_captions(files), total
  if kinds == {".parquet"}:
    if not caption_column:
      raise ValueError("parquet input needs --caption-column COLUMN (and --key-column COLUMN, "
                       "else keys are '<file stem>-<row, 6 digits>')")
    files = sources._parquet_files(input_pattern, [caption_column]
                                   + ([key_column] if key_column else []))
    return _parquet_captions(files, caption_column, key_column), _parquet_num_rows(files)
  raise ValueError(f"--input {input_pattern!r}: expected .jsonl or .parquet files, got "
                   f"{sorted(kinds)}")


def _parquet_num_rows(files: list[str]) -> int:
  import pyarrow.parquet as pq
  return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def reverse_items(input_pattern: str) -> tuple[Iterator[Item | BadInput], int]:
  """The IP2P parquet rows' texts, keyed by the id ``data build ip2p`` gives them."""
  columns = list(IP2P_TEXT_COLUMNS.values())
  files = sources._parquet_files(input_pattern, columns)

  def items():
    for path, row, values in sources._parquet_rows(files, columns):
      key, where = f"{_stem(path)}-{row:06d}", f"{path}:row {row}"
      texts = {field: _nonempty(values[column]) for field, column in IP2P_TEXT_COLUMNS.items()}
      empty = [IP2P_TEXT_COLUMNS[f] for f, text in texts.items() if not text]
      yield (BadInput(key, where, f"empty {', '.join(empty)}") if empty
             else Item(key, where, texts))
  return items(), _parquet_num_rows(files)


def in_shard(key: str, num_shards: int, shard: int) -> bool:
  """Whether ``key`` belongs to ``shard`` of ``num_shards`` (a stable hash: same on every host
  and Python process, unlike ``hash``)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % num_shards == shard


# ---------------------------------------------------------------------------------------------
# Prompts and validation.

@dataclasses.dataclass(frozen=True)
class Prompt:
  name: str     # the file's stem, e.g. "captions_v1"
  text: str     # the task and its examples; the input follows it
  sha256: str   # of the file's bytes


def load_prompt(mode: str, path: str | None = None) -> Prompt:
  """The mode's versioned prompt file (or ``path``)."""
  path = path or os.path.join(PROMPT_DIR, MODES[mode].prompt)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  return Prompt(_stem(path), data.decode("utf-8"), hashlib.sha256(data).hexdigest())


def user_message(mode: str, item: Item, prompt: Prompt) -> str:
  """The prompt, then the input as one JSON object on the last line (as in its examples)."""
  if mode == "captions":
    query = {"caption": item.texts["input_caption"]}
  else:
    query = {k: item.texts[k] for k in IP2P_TEXT_COLUMNS}
  return prompt.text.rstrip("\n") + "\n" + json.dumps(query, ensure_ascii=False)


class Rejected(Exception):
  """An answer that fails validation: ``reason`` (one of REJECT_REASONS) and a detail."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def _normalised(text: str) -> str:
  return " ".join(text.lower().split())


def clip_length(text: str) -> int:
  """CLIP tokens of ``text`` with BOS and EOS, untruncated (the default CLIP tokenizer)."""
  from uip2p_jax.tokenizer import default_tokenizer
  return len(default_tokenizer().tokenize(text)) + 2


def validate_answer(mode: str, item: Item, content: str) -> dict[str, str]:
  """The answer's fields, stripped; raises Rejected naming the first check that fails."""
  text = content.strip()
  fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)  # a markdown code fence
  try:
    answer = json.loads(fenced.group(1) if fenced else text)
  except json.JSONDecodeError as e:
    raise Rejected("invalid_json", f"{e.msg} at column {e.colno}") from None
  if not isinstance(answer, dict):
    raise Rejected("not_an_object", f"expected a JSON object, got {type(answer).__name__}")
  fields = {}
  for name in MODES[mode].answer_fields:
    value = answer.get(name)
    if not isinstance(value, str) or not value.strip():
      what = ("missing" if value is None else
              f"not a string ({type(value).__name__})" if not isinstance(value, str) else "empty")
      raise Rejected("empty_field", f"{name} is {what}")
    fields[name] = " ".join(value.split())  # one line: newlines and runs of spaces collapsed
  if (mode == "captions"
      and _normalised(fields["edited_caption"]) == _normalised(item.texts["input_caption"])):
    raise Rejected("unchanged_caption", "edited_caption equals the input caption")
  for name, value in fields.items():
    length = clip_length(value)
    if length > MAX_CLIP_TOKENS:
      raise Rejected("too_long", f"{name} has {length} CLIP tokens (at most {MAX_CLIP_TOKENS})")
  forward = fields.get("instruction", item.texts.get("instruction", ""))
  if _normalised(fields["reverse_instruction"]) == _normalised(forward):
    raise Rejected("reverse_copies_forward", "reverse_instruction equals the instruction")
  return fields


# ---------------------------------------------------------------------------------------------
# Outputs: append-only JSONL, resumable.

def output_paths(out_dir: str, mode: str, num_shards: int = 1, shard: int = 0
                 ) -> tuple[str, str]:
  """(kept lines, rejected lines) of a run; per shard when there are several."""
  suffix = f"-{shard:05d}-of-{num_shards:05d}" if num_shards > 1 else ""
  kept = MODES[mode].output.replace(".jsonl", f"{suffix}.jsonl")
  return os.path.join(out_dir, kept), os.path.join(out_dir, f"rejected{suffix}.jsonl")


def read_done(path: str, key_field: str, mode: str | None = None) -> tuple[set[str], int]:
  """(keys of the complete lines of ``path``, bytes of a half-written last line dropped).

  A last line without its newline (a killed run) is cut off the file, so the next line
  appended starts on a line of its own; its key is not done and is sent again.
  """
  done, dropped = set(), 0
  if not os.path.exists(path):
    return done, dropped
  with open(path, "rb+") as f:
    complete = 0
    for line in f:
      if not line.endswith(b"\n"):
        dropped = len(line)
        f.truncate(complete)
        break
      complete += len(line)
      try:
        obj = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        continue  # not ours to repair; data build reports it with its line number
      if isinstance(obj, dict) and key_field in obj and (mode is None
                                                         or obj.get("mode", mode) == mode):
        done.add(str(obj[key_field]))
  return done, dropped


class LineWriter:
  """Appends one JSON object per line, each with a single write() on an unbuffered file."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "ab", buffering=0)

  def write(self, obj: dict) -> None:
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    written = self._file.write(data)
    while written < len(data):  # regular files take it whole; a short write only finishes it
      written += self._file.write(data[written:])

  def close(self) -> None:
    self._file.close()


# ---------------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class Summary:
  kept: int = 0
  rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  failed: list = dataclasses.field(default_factory=list)    # (key, last error)
  bad_inputs: list = dataclasses.field(default_factory=list)  # BadInput
  already_done: int = 0
  other_shards: int = 0
  requests: int = 0
  tokens_in: int = 0
  tokens_out: int = 0
  seconds: float = 0.0
  stopped: str = ""  # why the run stopped early, if it did
  interrupted: bool = False

  @property
  def answered(self) -> int:
    return self.kept + sum(self.rejected.values())

  def text(self) -> str:
    rejected = sum(self.rejected.values())
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
    rate = (self.answered + len(self.failed)) / self.seconds if self.seconds else 0.0
    lines = [f"{self.kept} kept, {rejected} rejected" + (f" ({reasons})" if reasons else "")
             + f", {len(self.failed)} failed (not answered after the retries); "
             f"{self.already_done} already done, {len(self.bad_inputs)} input records skipped"
             + (f", {self.other_shards} in other shards" if self.other_shards else "")
             + f"; {self.requests} requests, tokens in {self.tokens_in} / out {self.tokens_out}; "
             f"{self.seconds:.1f} s ({rate:.1f} lines/s)"]
    lines += [f"  skipped {b.where}" + (f" (key {b.key})" if b.key else "") + f": {b.reason}"
              for b in self.bad_inputs[:20]]
    if len(self.bad_inputs) > 20:
      lines.append(f"  ... and {len(self.bad_inputs) - 20} more input records skipped")
    lines += [f"  failed {key}: {error}" for key, error in self.failed[:10]]
    if len(self.failed) > 10:
      lines.append(f"  ... and {len(self.failed) - 10} more failed keys (run again to retry)")
    if self.stopped:
      lines.append(f"  stopped early: {self.stopped}")
    return "\n".join(lines)


def generate(mode: str, items: Iterable[Item | BadInput], out_dir: str,
             config: ClientConfig | JaxConfig, *, prompt: Prompt | None = None,
             total: int | None = None, retry_rejected: bool = False, num_shards: int = 1,
             shard: int = 0, limit: int | None = None, progress: bool = True) -> Summary:
  """Answers every pending input record (an endpoint for a ClientConfig, the in-process model
  for a JaxConfig), validates the answers and appends the lines."""
  if not 0 <= shard < num_shards:
    raise ValueError(f"--shard {shard} is not in 0..{num_shards - 1} (--num-shards {num_shards})")
  prompt = prompt or load_prompt(mode)
  generator = None
  if isinstance(config, JaxConfig):  # a bad model folder stops here, before any file is written
    from uip2p_jax.data.jax_llm import GemmaGenerator
    generator = GemmaGenerator(config)
  clip_length("warm up")  # builds the tokenizer before the clock and the requests start
  os.makedirs(out_dir, exist_ok=True)
  kept_path, rejected_path = output_paths(out_dir, mode, num_shards, shard)
  done, dropped_kept = read_done(kept_path, MODES[mode].key_field)
  rejected_keys, dropped_rejected = read_done(rejected_path, "key", mode)
  for path, dropped in ((kept_path, dropped_kept), (rejected_path, dropped_rejected)):
    if dropped:
      print(f"{path}: dropped a half-written last line ({dropped} bytes; a killed run): its key "
            "is sent again", file=sys.stderr)
  if not retry_rejected:
    done |= rejected_keys
  summary = Summary()
  provenance = {"model": generator.model_id if generator else config.model,
                "prompt": prompt.name, "prompt_sha256": prompt.sha256,
                "temperature": config.temperature, "seed": config.seed}
  output = _Output(mode, provenance, summary, LineWriter(kept_path), LineWriter(rejected_path))
  bar = _progress_bar(mode, total, progress)
  pending = _pending(items, summary, done, bar, num_shards=num_shards, shard=shard, limit=limit)
  start = time.perf_counter()
  try:
    if generator is not None:
      _generate_jax(mode, pending, generator, prompt, output, bar)
    else:
      asyncio.run(_generate(mode, pending, config, prompt, output, bar))
  except KeyboardInterrupt:  # the lines written so far are whole; a rerun sends the rest
    summary.interrupted = True
    summary.stopped = "interrupted (Ctrl-C): run the same command again to continue"
  finally:
    summary.seconds = time.perf_counter() - start
    output.postfix(bar)
    bar.close()
    output.close()
  return summary


@dataclasses.dataclass
class _Output:
  """Validates answers and appends the kept and rejected lines, counting them."""
  mode: str
  provenance: dict
  summary: Summary
  kept_writer: LineWriter
  rejected_writer: LineWriter

  def refused(self, item: Item, detail: str) -> None:
    self.rejected_writer.write({"key": item.key, "mode": self.mode, "reason": "refused",
                                "detail": detail, "raw": None, **self.provenance})
    self.summary.rejected["refused"] += 1

  def answered(self, item: Item, content: str) -> None:
    try:
      fields = validate_answer(self.mode, item, content)
    except Rejected as e:
      self.rejected_writer.write({"key": item.key, "mode": self.mode, "reason": e.reason,
                                  "detail": e.detail, "raw": content, **self.provenance})
      self.summary.rejected[e.reason] += 1
      return
    if self.mode == "captions":
      line = {"key": item.key, "input_caption": item.texts["input_caption"], **fields}
    else:
      line = {"id": item.key, **item.texts, **fields}
    self.kept_writer.write({**line, **self.provenance})
    self.summary.kept += 1

  def postfix(self, bar) -> None:
    s = self.summary
    bar.set_postfix_str(f"kept={s.kept} rejected={sum(s.rejected.values())} "
                        f"failed={len(s.failed)} tok_in={s.tokens_in} tok_out={s.tokens_out}",
                        refresh=False)

  def close(self) -> None:
    self.kept_writer.close()
    self.rejected_writer.close()


def _progress_bar(mode: str, total: int | None, progress: bool):
  from tqdm import tqdm
  return tqdm(total=total, unit="rec", desc=f"instruct {mode}", disable=not progress,
              mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.05)


def _pending(items, summary: Summary, done: set[str], bar, *, num_shards: int, shard: int,
             limit: int | None) -> Iterator[Item]:
  """The items to answer: this shard's, first of their key, not done, at most `limit`; the
  rest are counted (and ticked off the bar) here."""
  seen: set[str] = set()
  sent = 0
  for item in items:
    if summary.stopped or (limit is not None and sent >= limit):
      return
    if isinstance(item, Item) and not in_shard(item.key, num_shards, shard):
      summary.other_shards += 1
    elif isinstance(item, BadInput):
      if item.key is None or in_shard(item.key, num_shards, shard):
        summary.bad_inputs.append(item)
    elif item.key in seen:
      summary.bad_inputs.append(BadInput(item.key, item.where, "duplicate key (first kept)"))
    else:
      seen.add(item.key)
      if item.key in done:
        summary.already_done += 1
      else:
        sent += 1
        yield item
        continue
    bar.update(1)


def _generate_jax(mode, pending, generator, prompt, output, bar):
  """Batches of prompts (batch_size, rounded up to the device count) through the in-process
  model, in input order."""
  summary = output.summary
  batch: list[tuple[Item, list[int]]] = []

  def flush():
    answers = generator.generate([item.key for item, _ in batch], [ids for _, ids in batch])
    for (item, _), answer in zip(batch, answers):
      summary.requests += 1
      summary.tokens_in += answer.prompt_tokens
      summary.tokens_out += answer.completion_tokens
      output.answered(item, answer.content)
    bar.update(len(batch))
    output.postfix(bar)
    batch.clear()

  from uip2p_jax.data.jax_llm import PromptTooLong
  for item in pending:
    ids = generator.encode(user_message(mode, item, prompt))
    try:
      generator.check_length(len(ids))
    except PromptTooLong as e:  # as an endpoint answers 400: this input, not the run, fails
      summary.requests += 1
      output.refused(item, str(e))
      bar.update(1)
      continue
    batch.append((item, ids))
    if len(batch) == generator.rows:
      flush()
  if batch:
    flush()


async def _generate(mode, pending, config, prompt, output, bar):
  import aiohttp
  summary = output.summary
  queue: asyncio.Queue = asyncio.Queue(maxsize=2 * config.concurrency)
  # A dead server fails every key after all its retries: stop after this many in a row.
  stop_after = max(20, 2 * config.concurrency)
  consecutive_failures = 0

  async def answer(item: Item, session, rng: random.Random) -> None:
    nonlocal consecutive_failures
    try:
      reply = await chat_completion(session, config, user_message(mode, item, prompt), rng)
    except Unanswered as e:
      summary.requests += config.max_retries + 1
      summary.failed.append((item.key, str(e)))
      consecutive_failures += 1
      if consecutive_failures >= stop_after and not summary.stopped:
        summary.stopped = (f"{consecutive_failures} keys in a row got no answer after the "
                           f"retries (last: {e}); is the server at {config.base_url} up?")
      return
    except Refused as e:
      summary.requests += 1
      output.refused(item, str(e))
      return
    consecutive_failures = 0
    summary.requests += reply.attempts
    summary.tokens_in += reply.prompt_tokens
    summary.tokens_out += reply.completion_tokens
    output.answered(item, reply.content)

  async def worker(index: int, session) -> None:
    rng = random.Random(f"{config.seed}-{index}")  # backoff jitter only
    while (item := await queue.get()) is not None:
      if summary.stopped:
        continue  # left for the next run, like the records the producer no longer reads
      await answer(item, session, rng)
      bar.update(1)
      output.postfix(bar)

  async def producer() -> None:
    for item in pending:
      await queue.put(item)
    for _ in range(config.concurrency):
      await queue.put(None)

  connector = aiohttp.TCPConnector(limit=config.concurrency, limit_per_host=config.concurrency)
  try:
    async with aiohttp.ClientSession(connector=connector) as session:
      async with asyncio.TaskGroup() as group:
        group.create_task(producer())
        for index in range(config.concurrency):
          group.create_task(worker(index, session))
  except* ServerError as group_error:
    raise group_error.exceptions[0] from None


__all__ = ["MODES", "REJECT_REASONS", "BadInput", "Item", "JaxConfig", "Prompt", "Rejected",
           "Summary", "caption_items", "clip_length", "generate", "in_shard", "load_prompt",
           "output_paths", "read_done", "reverse_items", "user_message", "validate_answer"]
