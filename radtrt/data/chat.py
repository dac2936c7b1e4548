"""A small client for OpenAI-compatible chat endpoints: rate limit, retries, on-disk cache.

Only the standard library (``urllib``): one POST to ``{endpoint}/chat/completions`` per request.
The API key comes from the caller (read from an environment variable by the CLI), is sent only
in the ``Authorization`` header and never appears in messages, logs or the cache. Error messages
carry the HTTP status and the server's own error message (one line, the key blanked), never the rest of the
response body (which may echo clinical text).

* Rate limit: request starts are spaced at least ``1 / rate_per_s`` seconds apart.
* Retries: HTTP 408/409/429/5xx, timeouts and connection errors are retried up to
  ``max_retries`` times with exponential backoff, or after ``Retry-After`` when the server says (at
  most ``MAX_WAIT_S``).
  Other 4xx answers fail at once (a bad key or model name does not get better by retrying).
* Redirects are not followed (urllib's would re-send the Authorization header to the other host and turn the
  POST into a GET): a redirect is refused, naming where it points.
* Cache: answers are stored under ``cache_dir`` keyed by a hash of (endpoint, model, messages,
  sampling settings); a rerun asks the endpoint only for what it has not answered yet.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from radtrt.errors import fail
from radtrt.http_retry import (MAX_TIMEOUT_S, MIN_REQUESTS_PER_MINUTE, REDIRECTS, RateLimiter, check_endpoint,
                               error_message, redirect_target, retry_after_seconds, retryable_status)
from radtrt.outputs import check_folder_target, replaced_atomically

MAX_WAIT_S = 120.0  # longest pause between attempts, whatever Retry-After asks
MAX_ERROR_BODY = 65536  # bytes of a refusal's body read for its message


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Leaves a 3xx answer as an ``HTTPError`` instead of following it (see the module's docstring)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)  # urlopen's handlers (proxies from the environment) but this one


def completions_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    check_endpoint(endpoint, "--endpoint")
    return endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"


def _connection_problem(reason: object) -> str:
    """A failed connection in words: "(last: gaierror)" said nothing of a host name that does not resolve."""
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve (check --endpoint)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (nothing listens at --endpoint?)"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timeout"
    return type(reason).__name__


@dataclass
class ChatClient:
    endpoint: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    key_env: str = "OPENAI_API_KEY"  # where the key was looked for, for the messages
    rate_per_s: float = 1.0
    max_retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    cache_dir: Path | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    requests_made: int = 0

    def __post_init__(self) -> None:
        self.url = completions_url(self.endpoint)
        # bounded as the judge's settings are (see http_retry): --rate 1e-300 and --timeout 1e12 overflowed the
        # rate limiter's sleep and the socket timeout, an OverflowError traceback
        min_rate = MIN_REQUESTS_PER_MINUTE / 60
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s >= min_rate):
            # "finite" said: "at least 0.000166667, got inf" read as if inf were too small
            fail(f"--rate must be a finite number of requests per second, at least {min_rate:.6g} (a request every "
                 f"{1 / min_rate:g} s), got {self.rate_per_s:g}")
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            fail(f"--timeout must be positive seconds, a finite number at most {MAX_TIMEOUT_S:g}, got "
                 f"{self.timeout_s:g}")
        if self.max_retries < 0:
            fail("--retries must be at least 0")
        if self.cache_dir is not None:  # before any request: answers paid for must have somewhere to go
            check_folder_target(self.cache_dir, "answer cache folder")
        self._limiter = RateLimiter(self.rate_per_s * 60, sleep=self.sleep)

    def _cache_file(self, payload: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps({"url": self.url, **payload}, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def complete(self, messages: list[dict[str, str]], *, temperature: float = 0.0, max_tokens: int = 400,
                 seed: int | None = None, keep: Callable[[str], bool] = lambda _: True) -> str:
        """The assistant's reply text for ``messages`` (from the cache when answered before). ``keep``: whether an
        answer may be cached (and taken from the cache): a refusal cached was replayed by every rerun."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                   "max_tokens": max_tokens}
        if seed is not None:
            payload["seed"] = seed
        cache = self._cache_file(payload)
        if cache is not None and cache.is_file():
            content = self._cached(cache)
            if keep(content):
                return content
        content = self._parse(self._post(payload))
        if cache is not None and keep(content):
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with replaced_atomically(cache) as tmp:
                    tmp.write_text(json.dumps({"content": content}))
            except OSError as e:  # a full disk, or a file where the folder should be
                fail(f"cannot write answer cache entry {cache}: {e.strerror}")
        return content

    @staticmethod
    def _cached(path: Path) -> str:
        try:
            content = json.loads(path.read_text(encoding="utf-8")).get("content")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            content = None
        if not isinstance(content, str):  # entries are written atomically: this one was changed by hand
            fail(f"answer cache entry {path} is damaged; delete it to ask the endpoint again")
        return content

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(payload).encode()
        problem = ""
        for attempt in range(self.max_retries + 1):
            self._limiter.acquire()
            self.requests_made += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            retry_after = None
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as response:
                    return self._json(response.read())
            except urllib.error.HTTPError as e:
                if e.code in REDIRECTS:
                    target = redirect_target(e.headers.get("Location"), self.url)
                    fail(f"chat endpoint redirected (HTTP {e.code})" + (f" to {target}" if target else "") +
                         "; give the final URL as --endpoint")
                if not retryable_status(e.code):
                    # with no key sent, "check the API key" sent the user to check a key that was never read
                    hint = "" if e.code not in (401, 403) else " (check the API key)" if self.api_key else \
                        f" (no API key was sent: {self.key_env} is not set; set it, or name another variable with " \
                        f"--api-key-env)"
                    sent = " ".join(str(m.get("content", "")) for m in payload["messages"])  # what it may quote
                    message = self._server_message(e, sent)
                    fail(f"chat endpoint refused the request: HTTP {e.code}" + (f": {message}" if message else "")
                         + hint)
                problem, retry_after = f"HTTP {e.code}", retry_after_seconds(e.headers)
            except http.client.InvalidURL as e:  # checked up front; never worth another attempt
                fail(f"--endpoint '{self.endpoint}' is not a valid URL ({e})")
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException) as e:  # HTTPException: a body cut off (IncompleteRead) and kin
                problem = _connection_problem(getattr(e, "reason", e))
            if attempt < self.max_retries:
                wait = retry_after if retry_after is not None else self.backoff_s * 2**attempt
                self.sleep(min(wait, MAX_WAIT_S))  # a server's Retry-After of a day is not obeyed silently
        tries = "once" if self.max_retries == 0 else f"{self.max_retries + 1} times"  # --retries 0: not "1 times"
        fail(f"chat endpoint failed {tries} (last: {problem}); rerun to resume")

    @staticmethod
    def _json(raw: bytes) -> dict[str, Any]:
        """The answer's body as JSON. Apart from the request: a ValueError of the request itself (a header
        http.client refuses) was reported as an answer that is not JSON."""
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            fail("chat endpoint answered with something that is not UTF-8 text")
        except (ValueError, RecursionError):  # JSONDecodeError, a number of 4300+ digits, nesting too deep
            fail("chat endpoint answered with something that is not JSON")

    def _server_message(self, error: urllib.error.HTTPError, sent: str) -> str | None:
        """The server's error message in a refusal's body, read as the judge's client reads it: a 400 said only
        "HTTP 400", hiding the reason (a parameter the model does not take)."""
        try:
            raw = error.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):  # the body was cut off: the status is all there is to say
            return None
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text)
        except (ValueError, RecursionError):  # not JSON (a text or HTML page): no message, only the status
            return None
        if isinstance(body, dict):
            body = body.get("error", body)
        return error_message(body, (self.api_key,), sent)

    @staticmethod
    def _parse(answer: dict[str, Any]) -> str:
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            fail("chat endpoint's answer has no choices[0].message.content")
        if content is not None and not isinstance(content, str):  # a number was called "empty content"
            fail(f"chat endpoint answered with content that is not text (JSON type {type(content).__name__})")
        if content is None or not content.strip():
            fail("chat endpoint answered with empty content")
        return content.strip()

