"""CLIP tokenization with transformers' `CLIPTokenizer`, padded/truncated to 77 ids.

A model folder's `tokenizer/` is used when there is one. Offline, with no folder, the original
CLIP BPE merges that ship inside the `clip-anytorch` wheel (`clip/bpe_simple_vocab_16e6.txt.gz`)
are turned into the `vocab.json` / `merges.txt` pair that `CLIPTokenizer` reads: the result is
token-for-token the tokenizer of `openai/clip-vit-large-patch14` (and so of SD 1.5 / IP2P).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from typing import Sequence

import numpy as np

MAX_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps this many merges of the BPE file (after its header line).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable-character table."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = list(printable), 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def _bpe_path() -> str:
  spec = importlib.util.find_spec("clip")  # locate the data file without importing torch code
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, _BPE_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"no CLIP BPE file ({_BPE_FILE}): install it with `pip install --no-deps "
      "clip-anytorch==2.6.0`, or pass a model folder / repo id that has a tokenizer/ subfolder")


def derive_vocab_files(out_dir: str, bpe_path: str | None = None) -> tuple[str, str]:
  """Write CLIPTokenizer's vocab.json and merges.txt derived from CLIP's BPE merges file."""
  bpe_path = bpe_path or _bpe_path()
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1:_NUM_MERGES + 1]
  byte_chars = list(_bytes_to_unicode().values())
  tokens = byte_chars + [c + "</w>" for c in byte_chars]
  tokens += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(out_dir, exist_ok=True)
  vocab_path, merges_path = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
  for path, text in ((vocab_path, json.dumps({t: i for i, t in enumerate(tokens)})),
                     (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)  # atomic: concurrent processes never read half a file
  return vocab_path, merges_path


@functools.lru_cache(maxsize=None)
def default_tokenizer():
  """The CLIP ViT-L/14 tokenizer built offline from the clip-anytorch BPE file."""
  from transformers import CLIPTokenizer
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                       "uip2p_jax", "clip_tokenizer")
  if not all(os.path.isfile(os.path.join(cache, f)) for f in ("vocab.json", "merges.txt")):
    derive_vocab_files(cache)
  return CLIPTokenizer.from_pretrained(cache, pad_token="<|endoftext|>",
                                       model_max_length=MAX_LENGTH)


def load_tokenizer(path_or_repo: str | None = None, subfolder: str | None = "tokenizer"):
  """A model's own tokenizer (folder or Hub repo), or the offline default when None."""
  if path_or_repo is None:
    return default_tokenizer()
  from transformers import CLIPTokenizer

  from uip2p_jax.weights import resolve_folder
  return CLIPTokenizer.from_pretrained(resolve_folder(path_or_repo, subfolder))


def tokenize(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
  """Texts -> (len(texts), max_length) int32 ids: BOS, tokens, EOS, then padding."""
  if isinstance(texts, str):
    raise TypeError("tokenize expects a sequence of strings, got a single string")
  ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")["input_ids"]
  return ids.astype(np.int32)
