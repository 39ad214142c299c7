"""A loopback OpenAI-compatible chat-completions server, scripted per input (aiohttp.web).

The server reads the input (the JSON object on the last line of the message that `uip2p data
instruct` sends) and answers by its caption (``caption``, or ``input_caption`` in reverse mode):
``script[caption]`` is a list of actions, one per attempt, then ``default`` ("good") for every
later attempt. Actions:

  "good"            a valid answer derived from the caption
  "malformed"       content that is not JSON
  "empty"           edited_caption ""
  "same"            edited_caption = the caption (other case and spacing)
  "long"            an edited caption of 100 words
  "copy"            reverse_instruction = instruction
  ("429", seconds)  HTTP 429 with Retry-After: seconds
  "500"             HTTP 500
  ("slow", seconds) a good answer after sleeping that long (past the client's timeout)
  "drop"            the connection closed with no response
  "fail"            HTTP 503, every attempt
  "401"             HTTP 401 (use as ``default``: a wrong key)

Every request is recorded as (caption, time, body) in ``requests``. Run as a script it serves
good answers only (for bench/instruct_loopback.py): ``python llm_server.py`` prints the port.
"""

import asyncio
import json
import threading
import time


def good_answer(caption: str, mode: str) -> dict:
  if mode == "reverse":
    return {"reverse_instruction": f"undo the edit of {caption}"}
  return {"instruction": "make it snowy", "edited_caption": f"{caption} in the snow",
          "reverse_instruction": "melt the snow"}


class LoopbackLLM:
  """Serves on 127.0.0.1 in a thread of its own (its own event loop) until ``close()``."""

  def __init__(self, script: dict | None = None, default: str = "good"):
    self.script = script or {}
    self.default = default
    self.requests: list[tuple[str, float, dict]] = []
    self.authorizations: set[str | None] = set()  # the Authorization headers received
    self._lock = threading.Lock()
    self._ready = threading.Event()
    self._thread = threading.Thread(target=self._serve, daemon=True)
    self._thread.start()
    if not self._ready.wait(30):
      raise RuntimeError("the loopback server did not start")

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def attempts(self, caption: str) -> int:
    with self._lock:
      return sum(1 for c, _, _ in self.requests if c == caption)

  def times(self, caption: str) -> list[float]:
    with self._lock:
      return [t for c, t, _ in self.requests if c == caption]

  def _action(self, caption: str, attempt: int):
    actions = self.script.get(caption, [])
    if actions == "fail":
      return "fail"
    return actions[attempt] if attempt < len(actions) else self.default

  async def _handle(self, request):
    from aiohttp import web
    body = await request.json()
    user = json.loads(body["messages"][-1]["content"].splitlines()[-1])  # the input
    mode = "reverse" if "input_caption" in user else "captions"
    caption = user.get("caption") or user.get("input_caption")
    with self._lock:
      attempt = sum(1 for c, _, _ in self.requests if c == caption)
      self.requests.append((caption, time.monotonic(), body))
      self.authorizations.add(request.headers.get("Authorization"))
    action = self._action(caption, attempt)
    name = action[0] if isinstance(action, tuple) else action
    if name == "429":
      return web.Response(status=429, text="rate limited",
                          headers={"Retry-After": str(action[1])})
    if name == "500":
      return web.Response(status=500, text="internal error")
    if name == "fail":
      return web.Response(status=503, text="overloaded")
    if name == "401":
      return web.Response(status=401, text="invalid api key")
    if name == "drop":
      request.transport.close()
      return web.Response(text="")  # never reaches the client
    if name == "slow":
      await asyncio.sleep(action[1])
    answer = good_answer(caption, mode)
    if name == "empty":
      answer["edited_caption"] = ""
    elif name == "same":
      answer["edited_caption"] = "  " + caption.upper() + " "
    elif name == "long":
      answer["edited_caption"] = " ".join(["word"] * 100)
    elif name == "copy":
      answer["reverse_instruction"] = answer["instruction"]
    content = "{not json" if name == "malformed" else json.dumps(answer)
    return web.json_response({
        "id": "chatcmpl-loopback", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

  def _serve(self):
    from aiohttp import web
    self._loop = asyncio.new_event_loop()
    asyncio.set_event_loop(self._loop)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", self._handle)
    self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    self._loop.run_until_complete(self._runner.setup())
    site = web.TCPSite(self._runner, "127.0.0.1", 0)
    self._loop.run_until_complete(site.start())
    self.port = site._server.sockets[0].getsockname()[1]
    self._ready.set()
    self._loop.run_forever()

  def close(self):
    async def stop():
      await self._runner.cleanup()
    asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(30)


if __name__ == "__main__":
  server = LoopbackLLM()
  print(server.port, flush=True)
  threading.Event().wait()
