"""`uip2p data instruct --backend jax` generation speed on the tests' tiny random Gemma 2.

The model and tokenizer are the tests' (tests/conftest.py: 2 layers, width 32, vocab 512, a
BPE tokenizer learned from the prompts, ~780 tokens per captions prompt); the generator is the
real one (`jax_llm.GemmaGenerator`: left-padded prompts, prefill, cached decoding, per-prompt
keys). A random model rarely ends its turn, so every row decodes --max-new-tokens. What this
measures is the fixed cost of the jitted loop on a CPU, not a real model's speed.

  .venv/bin/python bench/instruct_jax_cpu.py [--batch-size 8] [--max-new-tokens 64]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--batches", type=int, default=5, help="timed batches after the first")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import jax
  import torch
  from conftest import GEMMA_CONFIG, seeded, tiny_gemma_tokenizer
  from transformers import Gemma2Config, Gemma2ForCausalLM

  from uip2p_jax.data import instruct, jax_llm

  with tempfile.TemporaryDirectory() as folder:
    seeded(11)
    model = Gemma2ForCausalLM(Gemma2Config(**GEMMA_CONFIG))
    with torch.no_grad():
      for name, p in model.named_parameters():
        p.normal_(0.0, 0.5 if "norm" in name else 0.3)
    model.save_pretrained(folder)
    tiny_gemma_tokenizer(GEMMA_CONFIG["vocab_size"]).save_pretrained(folder)
    generator = jax_llm.GemmaGenerator(jax_llm.JaxConfig(
        model=folder, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens))
    prompt = instruct.load_prompt("captions")

    def batch(index):
      keys = [f"{index}-{row}" for row in range(generator.rows)]
      items = [instruct.Item(k, "", {"input_caption": f"a photo of a wooden house by a lake "
                                                      f"number {k}"}) for k in keys]
      return keys, [generator.encode(instruct.user_message("captions", item, prompt))
                    for item in items]

    start = time.perf_counter()
    generator.generate(*batch(0))
    first = time.perf_counter() - start
    times, generated, prompt_tokens = [], 0, 0
    for index in range(1, args.batches + 1):
      keys, prompts = batch(index)
      start = time.perf_counter()
      answers = generator.generate(keys, prompts)
      times.append(time.perf_counter() - start)
      generated += sum(a.completion_tokens for a in answers)
      prompt_tokens += sum(a.prompt_tokens for a in answers)
    per_batch = statistics.median(times)
    print(f"devices {jax.device_count()} ({jax.default_backend()}), cpu count {os.cpu_count()}; "
          f"batch {generator.rows}, ~{prompt_tokens // (generator.rows * args.batches)} prompt "
          f"tokens, {args.max_new_tokens} new tokens max")
    print(f"first batch (compile + run) {first:.2f} s; then median {per_batch:.3f} s per batch "
          f"= {generated / sum(times):.0f} generated tokens/s "
          f"({prompt_tokens / sum(times):.0f} prompt tokens/s prefilled alongside)")


if __name__ == "__main__":
  main()
