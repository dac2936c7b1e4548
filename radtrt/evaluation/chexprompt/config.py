"""Judge settings, kept apart from the client so that building them needs neither openai nor tenacity."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from radtrt.errors import fail
from radtrt.http_retry import MAX_TIMEOUT_S, MIN_REQUESTS_PER_MINUTE, check_endpoint


@dataclass(frozen=True)
class JudgeConfig:
    """Which judge to ask and how politely. Defaults follow the published settings (temperature 0, 128 tokens)."""

    model: str
    endpoint: Optional[str] = None  # OpenAI-compatible base URL, e.g. http://host:8000/v1 or https://api.openai.com/v1
    azure_endpoint: Optional[str] = None  # https://NAME.openai.azure.com; selects Azure OpenAI
    azure_deployment: Optional[str] = None  # defaults to ``model``
    api_version: Optional[str] = None  # Azure OpenAI API version, e.g. 2024-06-01
    prompt: str = "auto"  # auto | published | radtrt
    temperature: float = 0.0
    max_tokens: int = 128
    requests_per_minute: float = 30.0  # <= 0: unlimited
    concurrency: int = 4
    max_attempts: int = 6
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0  # per socket operation (connect, each read), as httpx applies it: not the whole request
    max_consecutive_failures: int = 10  # give up (resumably) when the endpoint looks down
    cache_path: Optional[Path] = None  # None: $XDG_CACHE_HOME/radtrt/chexprompt-judge.sqlite

    def __post_init__(self) -> None:
        if not self.model:
            fail("a judge model name is needed (--judge-model)")
        if self.prompt not in ("auto", "published", "radtrt"):
            fail(f"unknown --judge-prompt '{self.prompt}' (auto | published | radtrt)")
        if not self.endpoint and not self.azure_endpoint:
            # never a default: the SDK's would send report text to api.openai.com, or wherever OPENAI_BASE_URL says
            fail("CheXprompt sends reports to the judge: give --endpoint URL (OpenAI-compatible) "
                 "or --azure-endpoint URL")
        if self.endpoint and self.azure_endpoint:
            fail("give either --endpoint (OpenAI-compatible) or --azure-endpoint, not both")
        for option, url in (("--endpoint", self.endpoint), ("--azure-endpoint", self.azure_endpoint)):
            # else every request fails as a connection error and the run "succeeds" having scored nothing, or
            # the SDK raises InvalidURL as a traceback
            if url:
                check_endpoint(url, option)
        if self.azure_endpoint and not self.api_version:
            fail("Azure OpenAI needs an API version (--api-version, e.g. 2024-06-01)")
        if not self.azure_endpoint and (self.api_version or self.azure_deployment):  # else silently unused
            fail("--api-version and --azure-deployment are for Azure OpenAI: give --azure-endpoint too, or drop them")
        if self.concurrency < 1 or self.max_attempts < 1 or self.max_consecutive_failures < 1:
            fail("judge concurrency, attempts and failure limit must be at least 1")
        # bounded (see http_retry): --timeout 1e12 or --requests-per-minute 1e-9 was an OverflowError traceback
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            fail(f"the judge timeout must be a finite positive number of seconds, at most {MAX_TIMEOUT_S:g} "
                 f"(--timeout), got {self.timeout_s}")
        if not (math.isfinite(self.requests_per_minute) and
                (self.requests_per_minute == 0 or self.requests_per_minute >= MIN_REQUESTS_PER_MINUTE)):
            fail(f"--requests-per-minute must be a finite number >= 0: 0 for no limit, else at least "
                 f"{MIN_REQUESTS_PER_MINUTE:g} (a request every {60 / MIN_REQUESTS_PER_MINUTE:g} s), "
                 f"got {self.requests_per_minute}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2) or self.max_tokens < 1:
            fail("the judge temperature must be within 0-2 and its answer length at least 1 token")

    @property
    def is_azure(self) -> bool:
        return self.azure_endpoint is not None

    @property
    def cache_identity(self) -> str:
        """Who answers: the model name and a hash of where it is served (endpoint, Azure deployment).

        Why the place: one name (a local "gpt-4o" behind vLLM, two Azure deployments of one model) can be
        different judges, and the default cache is shared by every project. Hashed, because an endpoint
        URL may carry credentials. The URL as the SDK sends it: one trailing slash is added to an OpenAI-compatible
        base URL that lacks it and all are stripped from an Azure one, so "http://host/v1/" asked (and paid for)
        every report again that "http://host/v1" had cached; keys as written before, without the slash, still hit."""
        where = (f"azure {(self.azure_endpoint or '').rstrip('/')} {self.azure_deployment or self.model}"
                 if self.is_azure else f"openai {(self.endpoint or '').removesuffix('/')}")
        return f"{self.model} @{hashlib.sha256(where.encode()).hexdigest()[:16]}"

    def resolved_cache_path(self) -> Path:
        if self.cache_path is not None:
            return self.cache_path
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "radtrt" / "chexprompt-judge.sqlite"
