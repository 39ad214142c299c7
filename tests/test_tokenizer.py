"""The offline CLIP tokenizer equals OpenAI CLIP's own BPE tokenizer, and pads/truncates to 77."""

import importlib.util
import os

import numpy as np
import pytest

from uip2p_jax import tokenizer as tok

TEXTS = [
    "make it snowy",
    "A man wearing a denim jacket",
    "turn the jacket into a rain coat!",
    "Photo of a café, 1990s style; 4K, ultra-detailed",
    "",
]


def _openai_simple_tokenizer():
  """CLIP's reference tokenizer, loaded from its file without importing the torch package."""
  bpe = tok._bpe_path()
  spec = importlib.util.spec_from_file_location(
      "clip_simple_tokenizer", os.path.join(os.path.dirname(bpe), "simple_tokenizer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer(bpe)


def test_default_tokenizer_matches_openai_clip():
  reference = _openai_simple_tokenizer()
  ids = tok.tokenize(tok.default_tokenizer(), TEXTS)
  assert ids.shape == (len(TEXTS), 77) and ids.dtype == np.int32
  sot, eot = reference.encoder["<|startoftext|>"], reference.encoder["<|endoftext|>"]
  for row, text in zip(ids, TEXTS):
    expected = [sot] + reference.encode(text) + [eot]
    expected += [eot] * (77 - len(expected))  # SD pads with <|endoftext|>
    assert row.tolist() == expected, text


def test_truncates_to_77_keeping_eos():
  ids = tok.tokenize(tok.default_tokenizer(), ["snow " * 200])
  assert ids.shape == (1, 77)
  assert ids[0, 0] == 49406 and ids[0, -1] == 49407


def test_vocab_files_round_trip(tmp_path):
  vocab, merges = tok.derive_vocab_files(str(tmp_path))
  from transformers import CLIPTokenizer
  loaded = CLIPTokenizer.from_pretrained(str(tmp_path))
  assert len(loaded) == 49408
  assert loaded.convert_tokens_to_ids("<|endoftext|>") == 49407


def test_rejects_single_string():
  with pytest.raises(TypeError, match="sequence of strings"):
    tok.tokenize(tok.default_tokenizer(), "make it snowy")
