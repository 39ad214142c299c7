"""`uip2p data instruct` client overhead: lines/s against a loopback OpenAI-compatible server.

The server (tests/data/llm_server.py, aiohttp.web) answers at once with a valid answer, in a
process of its own; the client is the real one (`instruct.generate`: request, retries, JSON
validation, CLIP token counts, line-atomic appends). What is measured is the client's ceiling:
a real server (vLLM at a few thousand output tokens/s) is far slower, so the client is never
its bottleneck if this is well above the server's lines/s.

  .venv/bin/python bench/instruct_loopback.py [--lines 2000] [--concurrency 1 16 64]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lines", type=int, default=2000)
  parser.add_argument("--lines-at-1", type=int, default=300, help="lines at concurrency 1")
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
  args = parser.parse_args()
  from uip2p_jax.data import instruct, llm_client

  server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "data", "llm_server.py")],
                            stdout=subprocess.PIPE, text=True)
  try:
    port = int(server.stdout.readline())
    print(f"loopback server on 127.0.0.1:{port} (own process); cpu count {os.cpu_count()}")
    for concurrency in args.concurrency:
      lines = args.lines_at_1 if concurrency == 1 else args.lines
      with tempfile.TemporaryDirectory() as tmp:
        captions = os.path.join(tmp, "captions.jsonl")
        with open(captions, "w") as f:
          for i in range(lines):  # distinct captions, of CC3M's usual length
            f.write(json.dumps({"key": f"{i:09d}", "caption": f"a photo of a wooden house by a "
                                f"lake in the mountains at sunset number {i}"}) + "\n")
        items, total = instruct.caption_items(captions)
        config = llm_client.ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", model="bench",
                                       concurrency=concurrency)
        summary = instruct.generate("captions", items, os.path.join(tmp, "out"), config,
                                    total=total, progress=False)
        assert summary.kept == lines and not summary.failed, summary.text()
        print(f"concurrency {concurrency:3d}: {lines} lines in {summary.seconds:.2f} s = "
              f"{lines / summary.seconds:.0f} lines/s ({summary.requests / summary.seconds:.0f} "
              "requests/s)")
  finally:
    server.terminate()
    server.wait()


if __name__ == "__main__":
  main()
