"""Which failures of an OpenAI-compatible endpoint deserve another attempt, and how long the server asked to wait.

Shared by the report synthesizer (``data/chat.py``, plain urllib so that it needs no SDK) and the CheXprompt
judge (``evaluation/chexprompt/client.py``, the openai SDK for Azure): their own copies had drifted apart (a
520 was retried by one and fatal to the other)."""

from __future__ import annotations

import math
from typing import Mapping, Optional


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
