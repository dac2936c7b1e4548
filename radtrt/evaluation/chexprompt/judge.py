"""Judging many reports: cache first, then concurrent requests, a progress bar, and honest failures.

Each report ends as either error counts or a recorded failure (the judge's answer did not parse, the
response was not a chat completion, or the request failed after every retry). Only answers that parse
are cached, so running the same command again resumes with exactly the reports that are still missing.
When the endpoint rejects the key or does not know the model, or fails for many reports in a row
(unreadable answers included), the run stops with one line; what was judged so far stays in the cache.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import openai
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from radtrt.errors import fail
from radtrt.evaluation.chexprompt.cache import JudgeCache, prompt_hash
from radtrt.evaluation.chexprompt.client import (JudgeClient, MalformedResponse, describe, is_fatal, redirect,
                                                 refused)
from radtrt.evaluation.chexprompt.config import JudgeConfig
from radtrt.evaluation.chexprompt.parser import AnswerFormatError, ErrorCounts
from radtrt.evaluation.chexprompt.prompt import JudgePrompt, select_prompt
from radtrt.evaluation.records import ReportPair
from radtrt.progress import make_progress

# an unreadable answer is kept for audit in the results, cut to this many characters (the judge's
# answer length is set in tokens, but a misbehaving server may send megabytes)
MAX_KEPT_ANSWER = 4000


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one report: counts, or why there are none."""

    study: str
    counts: Optional[ErrorCounts]
    failure: Optional[str]
    answer: Optional[str]  # the raw answer, kept so that failures can be audited
    cached: bool

    def to_json(self) -> dict[str, Any]:
        return {"study": self.study, "errors": self.counts.to_json() if self.counts else None,
                "failure": self.failure, "answer": self.answer, "cached": self.cached}


class Judge:
    """A prompt, a client and a cache, wired together for one judge model."""

    def __init__(self, cfg: JudgeConfig, client: Optional[JudgeClient] = None,
                 prompt: Optional[JudgePrompt] = None, cache: Optional[JudgeCache] = None) -> None:
        self.cfg = cfg
        self.prompt = prompt or select_prompt(cfg.prompt)
        if client is None:
            from radtrt.evaluation.chexprompt.client import OpenAIJudgeClient

            client = OpenAIJudgeClient(cfg)
        self.client = client
        self.cache = cache or JudgeCache(cfg.resolved_cache_path())

    def _parsed(self, study: str, answer: Optional[str], cached: bool) -> Judgement:
        try:
            return Judgement(study, self.prompt.parse(answer), None, answer, cached)
        except AnswerFormatError as e:
            kept = answer if answer is None or len(answer) <= MAX_KEPT_ANSWER else answer[:MAX_KEPT_ANSWER] + " [...]"
            return Judgement(study, None, f"unparseable answer: {e}", kept, cached)

    def judge(self, pairs: Sequence[ReportPair], show_progress: bool = True,
              console: Optional[Console] = None) -> list[Judgement]:
        """Judge every (reference, prediction) pair; results come back in input order."""
        results: dict[int, Judgement] = {}
        # one request per distinct cache key, its answer shared by the rows with that key: asked once per row,
        # equal pairs got different answers, and the cache kept only the last, so a rerun disagreed with the run
        pending: dict[str, tuple[list[int], list[dict[str, str]]]] = {}
        for i, pair in enumerate(pairs):
            messages = self.prompt.build(pair.reference, pair.prediction)
            key = prompt_hash(messages, self.cfg.temperature, self.cfg.max_tokens)
            if key in pending:
                pending[key][0].append(i)
                continue
            answer = self.cache.get(self.cfg.cache_identity, key)
            judgement = self._parsed(pair.study, answer, cached=True) if answer is not None else None
            if judgement is not None and judgement.counts is not None:
                results[i] = judgement
            else:  # not asked yet, or an unreadable answer cached by an older radtrt: ask again
                pending[key] = ([i], messages)

        # the judge model's name as typed: '[/red]' in it was read as markup (a traceback on a terminal)
        progress = make_progress(TextColumn("judging ({task.fields[label]})", markup=False), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=console or Console(stderr=True),
                                 disable=not show_progress, transient=True)
        consecutive = streak_refused = streak_unreadable = 0
        rejected = False  # the endpoint refused the requests themselves: in-flight ones will not bring answers
        self.client.stopping.clear()
        with progress, ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            task = progress.add_task("judge", total=len(pairs), completed=len(results), label=self.cfg.model)
            futures: dict[Future[Optional[str]], tuple[list[int], str]] = {
                pool.submit(self.client.complete, messages): (rows, key) for key, (rows, messages) in pending.items()}
            try:
                for future in as_completed(futures):
                    rows, key = futures[future]
                    i = rows[0]
                    study = pairs[i].study
                    exc = future.exception()
                    sent = " ".join(str(m.get("content", "")) for m in pending[key][1])  # what an error may quote
                    if exc is None:
                        answer = future.result()
                        results[i] = self._parsed(study, answer, cached=False)
                        if results[i].counts is not None:
                            assert answer is not None
                            self.cache.put(self.cfg.cache_identity, key, answer)
                    elif redirect(exc) is not None:  # every request would be: the URL is not the endpoint's
                        rejected = True
                        fail(f"the judge endpoint redirected {redirect(exc)}; give the final URL as "
                             f"{'--azure-endpoint' if self.cfg.is_azure else '--endpoint'}")
                    elif is_fatal(exc):
                        rejected = True
                        fail(f"the judge endpoint refused the request ({describe(exc, sent)}): check the API key, "
                             f"the model or deployment name and the endpoint URL")
                    elif isinstance(exc, Exception) and _is_request_error(exc):
                        results[i] = Judgement(study, None, f"request failed: {describe(exc, sent)}", None, False)
                    else:
                        raise exc
                    for other in rows[1:]:  # the same request's answer, or its failure
                        results[other] = replace(results[i], study=pairs[other].study)
                    failure = results[i].failure
                    consecutive = 0 if failure is None else consecutive + 1
                    # refusals within the streak: "a rerun fails the same way" only when every failure was one
                    streak_refused = 0 if failure is None else streak_refused + (exc is not None and refused(exc))
                    # answers that did not parse: at temperature 0 a rerun gets them again
                    streak_unreadable = 0 if failure is None else streak_unreadable + (exc is None)
                    if failure is not None and consecutive >= self.cfg.max_consecutive_failures:
                        if streak_refused == consecutive:  # a rerun sends the same requests
                            rejected = True
                            fail(f"the judge failed {consecutive} reports in a row (last: {failure}); the endpoint "
                                 f"refuses the request itself, so a rerun fails the same way: check --judge-model "
                                 f"and --endpoint (or --azure-endpoint); answers so far are cached in "
                                 f"{self.cache.path}")
                        if streak_unreadable == consecutive and self.cfg.temperature == 0:
                            fail(f"the judge failed {consecutive} reports in a row (last: {failure}); none of its "
                                 f"answers could be read, and at temperature 0 a rerun gets the same answers: use a "
                                 f"judge model that answers in the CheXprompt format (--judge-model), or the other "
                                 f"prompt (--judge-prompt published or radtrt); answers so far are cached in "
                                 f"{self.cache.path}")
                        fail(f"the judge failed {consecutive} reports in a row (last: {failure}); answers so far "
                             f"are cached in {self.cache.path}, rerun to resume")
                    progress.advance(task, len(rows))
            except BaseException:  # interrupted, or stopped by a fatal answer: keep what is still arriving
                running = sum(f.running() for f in futures)
                if running:  # after a refusal (a rejected key) they will be refused too: no answers to promise
                    progress.console.print(f"stopping: waiting for {running} judge request(s) in flight" +
                                           ("" if rejected else "; the answers that can be read are cached"),
                                           highlight=False)
                self._stop(pool, futures, results, pairs)
                raise
        return [results[i] for i in range(len(pairs))]

    def _stop(self, pool: ThreadPoolExecutor, futures: dict[Future[Optional[str]], tuple[list[int], str]],
              results: dict[int, Judgement], pairs: Sequence[ReportPair]) -> None:
        """Drop the queued requests and every retry, wait for the requests in flight, and cache their answers
        that parse: the judge was paid for them, and a rerun then asks only for the rest."""
        self.client.stopping.set()
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
        for future, ([i, *_], key) in futures.items():
            if i in results or future.cancelled() or future.exception() is not None:
                continue
            answer = future.result()
            if answer is not None and self._parsed(pairs[i].study, answer, cached=False).counts is not None:
                self.cache.put(self.cfg.cache_identity, key, answer)


def _is_request_error(exc: Exception) -> bool:
    """Errors about one request (status, timeout, connection, a body that is no chat completion), as
    opposed to bugs."""
    return isinstance(exc, (openai.APIError, MalformedResponse))
