"""The OpenAI-compatible chat-completions client of `uip2p data instruct` (backend ``openai``).

Any OpenAI-compatible endpoint (vLLM, SGLang, TGI, Ollama, a hosted API) through aiohttp
(connection pooling, keep-alive and TLS that the standard library offers only synchronously).
429 (waiting its Retry-After), 408, 5xx, timeouts and dropped connections are retried with
exponential backoff and jitter, at most ``max_retries`` times; 401/403/404 (a wrong key, model
or URL) raise ServerError; another 4xx raises Refused (retrying would not help).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  base_url: str               # e.g. http://localhost:8000/v1 (…/chat/completions is appended)
  model: str
  api_key: str | None = None
  concurrency: int = 32
  timeout: float = 60.0       # seconds per request
  max_retries: int = 5        # retries after the first attempt
  retry_delay: float = 1.0    # first backoff in seconds; doubles per retry, jittered
  max_delay: float = 60.0
  temperature: float = 0.7
  seed: int = 0
  max_tokens: int = 256


class ServerError(Exception):
  """The endpoint refuses every request (a wrong API key, model or URL): the run stops."""


class Refused(Exception):
  """The endpoint refuses this request (400, 413, 422...): retrying would not help."""


class Unanswered(Exception):
  """No answer after the retries; the message is the last error."""


@dataclasses.dataclass(frozen=True)
class Answer:
  content: str
  prompt_tokens: int
  completion_tokens: int
  attempts: int


def _retry_after(value: str | None) -> float | None:
  """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    import email.utils
    try:
      return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
      return None


async def chat_completion(session, config: ClientConfig, message: str,
                          rng: random.Random) -> Answer:
  """One chat completion with the retries; raises Unanswered, Refused or ServerError."""
  import aiohttp
  url = config.base_url.rstrip("/") + "/chat/completions"
  payload = {"model": config.model, "temperature": config.temperature, "seed": config.seed,
             "max_tokens": config.max_tokens, "response_format": {"type": "json_object"},
             "messages": [{"role": "user", "content": message}]}
  headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
  timeout = aiohttp.ClientTimeout(total=config.timeout)
  error = ""
  for attempt in range(config.max_retries + 1):
    wait = None
    try:
      async with session.post(url, json=payload, headers=headers, timeout=timeout) as response:
        body = await response.text()
        status = response.status
        if status == 200:
          try:
            reply = json.loads(body)
            content = reply["choices"][0]["message"]["content"]
            if not isinstance(content, str):
              raise TypeError(f"content is {type(content).__name__}")
          except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            error = f"unreadable response ({type(e).__name__}: {e}): {body[:200]!r}"
          else:
            usage = reply.get("usage") or {}
            return Answer(content, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), attempt + 1)
        elif status == 429 or status == 408 or status >= 500:
          error = f"HTTP {status}: {body[:200]}"
          wait = _retry_after(response.headers.get("Retry-After"))
        elif status in (401, 403, 404):
          raise ServerError(f"{url} answered HTTP {status} (check --base-url, --model and the "
                            f"API key): {body[:300]}")
        else:
          raise Refused(f"HTTP {status}: {body[:1000]}")
    except (asyncio.TimeoutError, aiohttp.ClientError) as e:
      error = (f"no answer within {config.timeout:g} s" if isinstance(e, asyncio.TimeoutError)
               else f"{type(e).__name__}: {e}")
    if attempt == config.max_retries:
      break
    if wait is None:  # exponential backoff, "equal jitter": half fixed, half random
      wait = min(config.max_delay, config.retry_delay * 2 ** attempt) * rng.uniform(0.5, 1.0)
    await asyncio.sleep(min(wait, 600.0))
  attempts = config.max_retries + 1
  raise Unanswered(f"{error} (after {attempts} attempt{'s' if attempts > 1 else ''})")
