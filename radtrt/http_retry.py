"""What the two clients of OpenAI-compatible endpoints must agree on: which URLs can be one, which failures
deserve another attempt, how long the server asked to wait, and how far apart requests start.

Shared by the report synthesizer (``data/chat.py``, plain urllib so that it needs no SDK) and the CheXprompt
judge (``evaluation/chexprompt/client.py``, the openai SDK for Azure): their own copies had drifted apart (a
520 was retried by one and fatal to the other; a URL one refused, the other crashed on or retried)."""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.parse
from typing import Callable, Iterable, Mapping, Optional

from radtrt.errors import fail, printable

# bounded above: socket timeouts and the rate limiter's waits overflow (an OverflowError traceback) past
# threading.TIMEOUT_MAX, which --timeout 1e12 or a rate of 1e-300 reached
MAX_TIMEOUT_S = 3600.0  # an hour of silence from the endpoint is a dead connection
MIN_REQUESTS_PER_MINUTE = 0.01  # one request in 100 minutes; slower spacing is no rate limit anyone means
REDIRECTS = (301, 302, 303, 307, 308)  # the statuses that send a client elsewhere (Location)
MAX_SERVER_MESSAGE = 200  # characters of a server's error message shown
_HOST = re.compile(r"[\w.-]+")  # letters (IDN too), digits, dots, hyphens, underscores (container names)
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a request line: spaces, controls


def endpoint_problem(url: str, option: str) -> str | None:
    """Why ``url`` cannot be an endpoint's base URL, in one line naming ``option``, or None. Checked before any
    work: a bad port or bracket crashed the openai SDK with a traceback and failed urllib's request as
    "retryable", and a URL without a usable host ran the whole job with every request failing, then said
    "rerun"."""
    if not url.startswith(("http://", "https://")):
        return f"{option} must be an http(s) URL, got '{url}'"
    if "@" in _netloc(url):  # the URL is not repeated: it holds a password
        # urllib took 'user:pw@host' for a host name and retried a DNS failure six times ("gaierror"); the SDK sent
        # them as Basic credentials beside its own Authorization header
        return (f"{option} holds a user name or password ('user:password@' before the host), which radtrt does not "
                f"send: give the URL without them (the API key is read from its environment variable)")
    if _UNSENDABLE.search(url):
        return f"{option} '{url}' contains a space or control character"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parsed on access: a non-number or one out of range raises here
    except ValueError as e:  # an unclosed IPv6 bracket, a port that is no number
        return f"{option} '{url}' is not a valid URL ({e})"
    host = parts.hostname
    if not host:
        return f"{option} '{url}' names no host"
    if ":" not in host and not _HOST.fullmatch(host):  # ':' only in an IPv6 literal, which urlsplit checked
        return f"{option} '{url}' has an invalid host name '{host}'"
    if port == 0:
        return f"{option} '{url}' names port 0, which nothing listens on"
    return None


def _netloc(url: str) -> str:
    """The URL's ``user:password@host:port`` part."""
    try:
        return urllib.parse.urlsplit(url).netloc
    except ValueError:  # an unclosed IPv6 bracket: the text up to the path, which the next check's line would repeat
        return re.split(r"[/?#]", url.split("//", 1)[-1], maxsplit=1)[0]


def check_endpoint(url: str, option: str) -> None:
    """Refuse ``url`` in one line when it cannot be an endpoint (see ``endpoint_problem``)."""
    problem = endpoint_problem(url, option)
    if problem is not None:
        fail(problem)


def check_api_key(key: str, env: str) -> None:
    """Refuse, naming the environment variable ``env`` but never the key, one that cannot be sent: a trailing
    \\r (a key file saved with Windows line ends) made the synthesizer say the endpoint's answer was not JSON,
    and the judge retry every report as a "connection error". Anything a header can carry is left to the
    endpoint to judge (a self-hosted server's key may be any text)."""
    if any(c in "\r\n" for c in key):
        what = "a line break (a key file saved with Windows line ends leaves a \\r), which no HTTP header can carry"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key):
        what = "a control character, which no HTTP header can carry"
    elif not key.isascii():
        what = "a character that is not ASCII, which an HTTP header cannot carry as it is"
    else:
        return
    fail(f"the API key in {env} holds {what}; set {env} to the key alone")


def redirect_target(location: Optional[str], url: str) -> Optional[str]:
    """Where a redirect's ``Location`` (relative to the request's ``url``) points, as ``scheme://host[:port]`` for
    a message, or None when there is none. Neither client follows redirects: urllib re-sent the Authorization
    header to the other host and turned the POST into a GET, and the answer to that was written as findings. Only
    the scheme and host are named, never the path or query (a redirect may carry a key or a token there)."""
    if not location:
        return None
    try:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location.strip()))
        port = parts.port
    except ValueError:  # an unclosed bracket or a port that is no number: no place worth naming
        return None
    if not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return printable(f"{parts.scheme}://{host}" + (f":{port}" if port is not None else ""))


QUOTE_RUN = 16  # characters of the request a server's message may repeat before it is taken as quoting it
QUOTES_REQUEST = "its message quotes the request, which holds clinical text: not shown"


def quotes(message: str, sent: str) -> bool:
    """Whether ``message`` repeats a run of ``QUOTE_RUN`` characters of ``sent`` (case and spacing aside): a
    validation error that echoes its input (FastAPI's 422, a proxy's "invalid input: ...") carried the report or
    the indication onto stderr. A generic message shares no such run with a radiology prompt."""
    norm = lambda text: " ".join(text.lower().split())  # noqa: E731
    message, sent = norm(message), norm(sent)
    return any(message[i:i + QUOTE_RUN] in sent for i in range(len(message) - QUOTE_RUN + 1))


def error_message(body: object, secrets: Iterable[Optional[str]] = (), sent: str = "") -> Optional[str]:
    """The error message in a failed response's body, on one line of at most ``MAX_SERVER_MESSAGE`` characters,
    printable, with ``secrets`` (API keys) blanked out; None when the server sent none.

    ``body`` as the openai SDK keeps it: a JSON body's ``error`` value (or the whole object when it has none), or
    the text of a non-JSON one. Why: "HTTP 400" alone hid the reason (OpenAI's reasoning models reject max_tokens
    and temperature, and say so). Of an object only its message is read: a validation error's other fields may
    echo the report sent. A non-JSON body (a text or HTML page, a proxy's or the server's own) has no message
    field to tell from the rest, and may echo the request's clinical text as well: none of it is shown, the
    status alone says what happened. ``sent``: the request's text, which a message that quotes it is not shown
    for (``quotes``)."""
    if not isinstance(body, dict):
        return None
    text = next((body[k] for k in ("message", "detail", "error") if isinstance(body.get(k), str)), None)
    if text is None:
        return None
    for secret in secrets:
        if secret and len(secret) >= 8:  # a keyless local server's "x" is no secret, and blanking it garbles text
            text = text.replace(secret, "[key]")
    text = printable(" ".join(text.split()))
    if not text:
        return None
    if quotes(text, sent):
        return QUOTES_REQUEST
    return text if len(text) <= MAX_SERVER_MESSAGE else text[:MAX_SERVER_MESSAGE - 3] + "..."


def retryable_status(code: int) -> bool:
    """Timeouts, conflicts, rate limits and server errors pass; the rest fail the same way every time, 501 (no
    such endpoint: a wrong URL) and 505 among the server errors."""
    return code in (408, 409, 429) or (code >= 500 and code not in (501, 505))


def retry_after_seconds(headers: Optional[Mapping[str, str]]) -> Optional[float]:
    """The wait the server asked for (``retry-after-ms``, or ``retry-after`` in seconds), or None when it sent
    none, an HTTP date or a non-finite number: the caller then backs off exponentially."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart, across all worker threads (the judge's); one
    request at a time for the synthesizer."""

    def __init__(self, requests_per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self._interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self._interval == 0.0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            self._sleep(start - now)
