"""The in-process generator of `uip2p data instruct --backend jax`: Gemma 2 on this host's
devices, no server (a TPU VM or pod host that trains can write its data too).

The model is our Flax `Gemma2ForCausalLM` (uip2p_jax/models/gemma.py), loaded from a Hugging
Face folder or repo id (google/gemma-2-2b-it: config.json, safetensors, tokenizer.json) by
`weights.load_gemma2`; its tokenizer.json is read by `tokenizers` (no sentencepiece).

Generation is one jitted program per (batch, prompt bucket) shape: prompts are wrapped in
Gemma's chat turns, left-padded to a multiple of PROMPT_BUCKET tokens, prefilled into a key /
value cache of bucket + max_new_tokens slots, then decoded a token at a time until every row
has ended its turn (<end_of_turn> or <eos>) or max_new_tokens. The batch is split over the
``data`` axis of a mesh of this process's devices; weights are replicated. Each prompt samples
with its own key, derived from the run seed and the input's key, so what a prompt gets does not
depend on which prompts share its batch or on the device count (up to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os

import numpy as np

PROMPT_BUCKET = 64  # prompt lengths are padded to a multiple of this: few compiled shapes
# Gemma's chat format (its tokenizer_config.json chat template, one user turn), after <bos>.
CHAT_TURNS = "<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>"


@dataclasses.dataclass(frozen=True)
class JaxConfig:
  model: str                  # a Gemma 2 folder or Hugging Face repo id
  batch_size: int = 32        # prompts per generate call (rounded up to the device count)
  max_new_tokens: int = 256
  temperature: float = 0.7    # 0: greedy
  seed: int = 0
  dtype: str = "float32"      # compute and weight dtype: float32 or bfloat16


@dataclasses.dataclass(frozen=True)
class Generated:
  content: str
  prompt_tokens: int
  completion_tokens: int  # generated tokens, the one that ended the turn included


class PromptTooLong(ValueError):
  """A prompt that leaves no room for max_new_tokens in the model's positions."""


def model_id(path_or_repo: str, folder: str) -> str:
  """What wrote the lines: an absolute folder with a fingerprint of its weight files (a new
  export into the same folder is another model), or a repo id with its snapshot's commit."""
  if os.path.isdir(path_or_repo):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    stamp = "|".join(f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}"
                     for f in files)
    fingerprint = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return f"{os.path.abspath(path_or_repo)} (weights {fingerprint})"
  return f"{path_or_repo}@{os.path.basename(os.path.normpath(folder))}"


def prompt_key_data(seed: int, key: str) -> np.ndarray:
  """A threefry key (2 uint32) from the run seed and an input key: stable across processes,
  batches and devices."""
  digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()
  return np.frombuffer(digest[:8], np.uint32).copy()


def _sample(graphdef, state, prompt_ids, padding, key_data, temperature, is_stop, *,
            max_new_tokens, greedy, batch_sharding):
  """(B, P) left-padded prompts -> (B, max_new_tokens) tokens and (B,) counts generated (the
  ending token included; rows that never end count max_new_tokens). is_stop: (vocab,) bool."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_ids.shape
  slots = prompt_len + max_new_tokens
  keys = jax.random.wrap_key_data(key_data)                           # (B,) threefry keys
  key_valid = jnp.arange(slots)[None, :] >= padding[:, None]          # (B, S)
  pin = lambda tree: jax.lax.with_sharding_constraint(tree, batch_sharding)
  cache = pin(model.init_cache(batch, slots))
  positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - padding[:, None], 0)
  hidden, cache = model.model(prompt_ids, positions=positions, cache=cache, cache_index=0,
                              key_valid=key_valid)
  lengths = prompt_len - padding                                      # real prompt tokens

  def pick(hidden_last, step):  # (B, hidden) -> (B,) the next tokens
    logits = model.logits(hidden_last)
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
    return jax.vmap(jax.random.categorical)(step_keys, logits / temperature).astype(jnp.int32)

  def ended(token):
    return is_stop[token]

  first = pick(hidden[:, -1], 0)
  tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = ended(first)
  counts = jnp.ones((batch,), jnp.int32)

  def cond(carry):
    step, _, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, cache, last, tokens, done, counts = carry
    hidden, cache = model.model(last[:, None], positions=(lengths + step - 1)[:, None],
                                cache=cache, cache_index=prompt_len + step - 1,
                                key_valid=key_valid)
    token = pick(hidden[:, 0], step)
    tokens = tokens.at[:, step].set(jnp.where(done, 0, token))
    counts = counts + (~done).astype(jnp.int32)
    return step + 1, pin(cache), token, tokens, done | ended(token), counts

  _, _, _, tokens, _, counts = jax.lax.while_loop(
      cond, body, (jnp.int32(1), cache, first, tokens, done, counts))
  return tokens, counts


class GemmaGenerator:
  """Loads the model and tokenizer once; `generate` answers a list of user messages."""

  def __init__(self, config: JaxConfig):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tokenizers import Tokenizer

    from uip2p_jax import sharding, weights
    from uip2p_jax.model_set import dtype_of
    self.config = config
    folder = weights.resolve_folder(config.model)
    # The tokenizer first: a folder without one fails before gigabytes of weights are read.
    # tokenizers itself, not transformers' GemmaTokenizer around it: the same tokenizer.json
    # and ids, without seconds of transformers imports per process.
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
      raise weights.CheckpointError(f"{folder}: no tokenizer.json (Gemma's tokenizer, as "
                                    "google/gemma-2-2b-it has it beside the weights)")
    try:
      self.tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception type for a bad file
      raise weights.CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    end_of_turn = self.tokenizer.token_to_id(END_OF_TURN)
    if end_of_turn is None:
      raise weights.CheckpointError(f"{path}: no {END_OF_TURN} token: not a Gemma chat "
                                    "tokenizer")
    model = weights.load_gemma2(folder, dtype=dtype_of(config.dtype))
    self.model_id = model_id(config.model, folder)
    self.model_config = model.config
    self.bos_id = self.tokenizer.token_to_id("<bos>")
    if self.bos_id is None:
      self.bos_id = model.config.bos_token_id
    stop = {end_of_turn, *model.config.eos_token_id}
    if self.tokenizer.token_to_id("<eos>") is not None:
      stop.add(self.tokenizer.token_to_id("<eos>"))
    # A mask over the vocabulary, not a list: its shape never changes what is compiled.
    self.is_stop = np.zeros((model.config.vocab_size,), bool)
    self.is_stop[sorted(i for i in stop if i < model.config.vocab_size)] = True
    # One mesh over this process's devices: on a pod each host is its own shard of the input
    # (--num-shards / --shard), so no host waits for another's batches.
    devices = jax.local_devices()
    self.mesh = sharding.make_mesh(data=len(devices), fsdp=1, devices=devices)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.rows = -(-config.batch_size // len(devices)) * len(devices)
    self._replicated = sharding.replicated(self.mesh)
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, self._replicated)  # 5 GB in bfloat16 for the 2B model
    self._sample = jax.jit(
        functools.partial(_sample, graphdef, max_new_tokens=config.max_new_tokens,
                          greedy=config.temperature <= 0, batch_sharding=self.batch_sharding))
    self._temperature = jnp.float32(max(config.temperature, 1e-6))

  def encode(self, message: str) -> list[int]:
    """<bos> and the message in Gemma's chat turns, ending where the model's turn begins."""
    # (Gemma's template trims the message.)
    text = CHAT_TURNS.format(message=message.strip())
    return [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids

  def check_length(self, prompt_tokens: int) -> None:
    limit = self.model_config.max_position_embeddings
    if prompt_tokens + self.config.max_new_tokens > limit:
      raise PromptTooLong(f"the prompt's {prompt_tokens} tokens and --max-new-tokens "
                          f"{self.config.max_new_tokens} exceed the model's {limit} positions")

  def generate(self, keys: list[str], prompts: list[list[int]]) -> list[Generated]:
    """Answers for the token prompts (at most `batch_size`; `encode`d, `check_length`ed)."""
    import jax
    count = len(prompts)
    if not 0 < count <= self.rows:
      raise ValueError(f"{count} prompts for a batch of {self.rows}")
    # Short batches repeat their first prompt: one compiled shape per prompt bucket.
    prompts = prompts + [prompts[0]] * (self.rows - count)
    keys = keys + [keys[0]] * (self.rows - count)
    longest = max(len(p) for p in prompts)
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    pad_id = self.model_config.pad_token_id
    ids = np.full((self.rows, width), pad_id, np.int32)
    padding = np.zeros((self.rows,), np.int32)
    for row, prompt in enumerate(prompts):
      ids[row, width - len(prompt):] = prompt
      padding[row] = width - len(prompt)
    key_data = np.stack([prompt_key_data(self.config.seed, k) for k in keys])
    put = lambda x: jax.device_put(x, self.batch_sharding)
    tokens, counts = self._sample(self.state, put(ids), put(padding), put(key_data),
                                  self._temperature,
                                  jax.device_put(self.is_stop, self._replicated))
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    answers = []
    for row in range(count):
      generated = tokens[row, :counts[row]].tolist()
      text_ids = generated[:-1] if generated and self.is_stop[generated[-1]] else generated
      answers.append(Generated(self.tokenizer.decode(text_ids, skip_special_tokens=True),
                               len(prompts[row]), int(counts[row])))
    return answers
