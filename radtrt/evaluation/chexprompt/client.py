"""Talking to the judge: OpenAI-compatible endpoints and Azure OpenAI through the ``openai`` SDK.

The SDK's own retries are switched off so that one policy, here, decides: rate-limit and server errors,
timeouts and dropped connections are retried with exponential backoff (honouring ``Retry-After``), up to
``max_attempts``; anything else is final. Requests are spaced by a shared rate limiter so that
concurrent workers stay under the endpoint's requests-per-minute quota. The API key comes from the
environment and is never logged, stored or echoed in messages. Redirects are not followed (the SDK's httpx
client would follow them, re-sending the key to wherever they point): a redirect stops the run, naming where it
points.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional, Protocol

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from radtrt.errors import fail
from radtrt.evaluation.chexprompt.config import JudgeConfig
from radtrt.evaluation.chexprompt.prompt import Messages
from radtrt.http_retry import (REDIRECTS, RateLimiter, check_api_key, error_message, redirect_target,
                               retry_after_seconds, retryable_status)

OPENAI_KEY_ENV = "OPENAI_API_KEY"
AZURE_KEY_ENV = "AZURE_OPENAI_API_KEY"


class MalformedResponse(Exception):
    """The endpoint answered, but not with a chat completion (a truncated or non-JSON body, text where a
    list belongs): a failure of that report, as a dropped connection is, not a crash of the run."""


class Stopped(Exception):
    """The run is stopping (interrupted, or ended by a fatal error): no further attempt is made."""


class JudgeClient(Protocol):
    """Anything that turns chat messages into the judge's answer text (tests may pass their own).

    ``stopping`` is set when the run ends early: no request may start after it, so an interrupted run does
    not keep paying for retries while it waits for the requests already in flight."""

    stopping: threading.Event

    def complete(self, messages: Messages) -> Optional[str]: ...


def server_wait(exc: BaseException) -> Optional[float]:
    """The wait the server asked for in the failed response's headers, if it sent one."""
    return retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None))


def is_retryable(exc: BaseException) -> bool:
    """Rate limits, server errors, timeouts and connection failures are worth another attempt."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return retryable_status(exc.status_code)
    return False


def redirect(exc: BaseException) -> Optional[str]:
    """For a redirect the client did not follow, "(HTTP 302) to https://host" (the target named as
    ``http_retry.redirect_target`` does, or left out when the answer names none); None for anything else."""
    if not (isinstance(exc, openai.APIStatusError) and exc.status_code in REDIRECTS):
        return None
    response = getattr(exc, "response", None)
    location = getattr(response, "headers", {}).get("location")
    target = redirect_target(location, str(getattr(getattr(response, "request", None), "url", "")))
    return f"(HTTP {exc.status_code})" + (f" to {target}" if target else "")


def is_fatal(exc: BaseException) -> bool:
    """Errors that will hit every report alike (bad key, unknown model or deployment): stop the run."""
    return isinstance(exc, openai.APIStatusError) and exc.status_code in (401, 403, 404)


def refused(exc: BaseException) -> bool:
    """A 4xx other than a timeout, conflict or rate limit: the endpoint rejects the request itself (a parameter the
    model does not take, a body too large), so asking again, now or in a rerun, gets the same answer."""
    return isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500 and not is_retryable(exc)


def server_message(exc: BaseException, sent: str = "") -> Optional[str]:
    """The error message in a failed response's body (see ``http_retry.error_message``), with the API keys of the
    environment blanked out, and not shown where it quotes ``sent`` (the request's text); None when the server
    sent none. Only the body is read, never the request or its headers."""
    # the SDK's parsed body: the "error" object of a JSON one, or its text
    return error_message(getattr(exc, "body", None), (os.environ.get(env) for env in (OPENAI_KEY_ENV, AZURE_KEY_ENV)),
                         sent)


def describe(exc: BaseException, sent: str = "") -> str:
    """A short, key-free description of a judge request failure (``sent``: see ``server_message``)."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection error"
    if isinstance(exc, openai.APIStatusError):
        message = server_message(exc, sent)
        return f"HTTP {exc.status_code}" + (f": {message}" if message else "")
    if isinstance(exc, MalformedResponse):
        return str(exc)
    return type(exc).__name__


class OpenAIJudgeClient:
    """A judge behind an OpenAI-compatible or Azure OpenAI chat-completions endpoint."""

    def __init__(self, cfg: JudgeConfig, sleep: Optional[Callable[[float], object]] = None) -> None:
        self._cfg = cfg
        self.stopping = threading.Event()
        self._sleep = sleep or self.stopping.wait  # a backoff pause ends as soon as the run stops
        self._limiter = RateLimiter(cfg.requests_per_minute, sleep=self.stopping.wait)  # no waiting past a stop
        # initial * 2**(attempt - 1), plus up to ``initial`` of jitter so that workers do not retry in step.
        self._backoff = wait_exponential_jitter(multiplier=cfg.backoff_initial_s, jitter=cfg.backoff_initial_s,
                                                max=cfg.backoff_max_s)
        key_env = AZURE_KEY_ENV if cfg.is_azure else OPENAI_KEY_ENV
        api_key = os.environ.get(key_env)
        if not api_key:
            fail(f"set {key_env} to the judge endpoint's API key (any non-empty value for a keyless local server)")
        check_api_key(api_key, key_env)
        self._client: openai.OpenAI
        http_client = openai.DefaultHttpxClient(follow_redirects=False)  # the SDK's defaults, but this one
        if cfg.azure_endpoint is not None:
            self._client = openai.AzureOpenAI(azure_endpoint=cfg.azure_endpoint, api_key=api_key,
                                              api_version=cfg.api_version,
                                              azure_deployment=cfg.azure_deployment or cfg.model,
                                              max_retries=0, timeout=cfg.timeout_s, http_client=http_client)
        else:
            self._client = openai.OpenAI(base_url=cfg.endpoint, api_key=api_key, max_retries=0,
                                         timeout=cfg.timeout_s, http_client=http_client)

    def _wait(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = server_wait(exc) if exc is not None else None
        if asked is not None:
            return min(asked, self._cfg.backoff_max_s)
        return self._backoff(retry_state)

    def complete(self, messages: Messages) -> Optional[str]:
        """The judge's answer text; raises the last SDK error when every attempt failed."""
        for attempt in Retrying(stop=stop_after_attempt(self._cfg.max_attempts), wait=self._wait,
                                retry=retry_if_exception(is_retryable), sleep=self._sleep, reraise=True):
            with attempt:
                if self.stopping.is_set():
                    raise Stopped()
                self._limiter.acquire()
                if self.stopping.is_set():  # stopped while waiting for a slot of the rate limit
                    raise Stopped()
                try:
                    response = self._client.chat.completions.create(
                        model=self._cfg.model, messages=messages,  # type: ignore[arg-type]
                        temperature=self._cfg.temperature, max_tokens=self._cfg.max_tokens)
                except (ValueError, RecursionError) as e:  # the SDK could not read the body: JSONDecodeError,
                    # UnicodeDecodeError, a number of 4300+ digits; JSON nested too deeply (a traceback, exit 1)
                    raise MalformedResponse(f"unreadable response body ({type(e).__name__})") from e
        return answer_text(response)


def answer_text(response: object) -> Optional[str]:
    """The first choice's text (None when the judge gave none); anything not shaped like a chat completion
    raises ``MalformedResponse``. The SDK returns a plain string for a non-JSON body and does not check
    the fields of a JSON one."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise MalformedResponse("the response is not a chat completion")
    if not choices:
        return None
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if content is not None and not isinstance(content, str):
        raise MalformedResponse("the answer's content is not text")
    return content
