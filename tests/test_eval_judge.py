"""The CheXprompt judge client, retries, rate limiting, cache, resumption and parity, against a real HTTP
server on 127.0.0.1 that serves scripted OpenAI-compatible answers (no external service is reached)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from radtrt.errors import RadtrtError
from radtrt.evaluation.bootstrap import BootstrapConfig
from radtrt.evaluation.chexprompt.client import OpenAIJudgeClient
from radtrt.http_retry import RateLimiter
from radtrt.evaluation.chexprompt.config import JudgeConfig
from radtrt.evaluation.chexprompt.judge import Judge, Judgement
from radtrt.evaluation.chexprompt.parser import ErrorCounts, format_answer
from radtrt.evaluation.parity import chexprompt_parity, parity_from_judgements
from radtrt.evaluation.records import ReportPair
from radtrt.evaluation.run import EvalConfig, evaluate

KEY = "sk-test-DO-NOT-LOG-4242"
ZERO = (0, 0, 0, 0, 0, 0)
Action = tuple[Any, ...]  # ("answer", text) | ("status", code, headers, body) | ("sleep", seconds, text)


def answer(sig: tuple[int, ...] = ZERO, insig: tuple[int, ...] = ZERO) -> str:
    return format_answer(ErrorCounts(sig, insig))


class FakeJudge:
    """Scripted answers per candidate text (consumed in order), then a default responder."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.scripts: dict[str, list[Action]] = {}
        self.default: Callable[[str], Action] = lambda candidate: ("answer", answer())
        self.url = ""

    def act(self, candidate: str) -> Action:
        with self.lock:
            queue = self.scripts.get(candidate)
            if queue:
                return queue.pop(0)
        return self.default(candidate)

    def count(self, candidate: str) -> int:
        return sum(r["candidate"] == candidate for r in self.requests)


def _candidate(body: dict[str, Any]) -> str:
    user = body["messages"][-1]["content"]
    start = user.rindex('Candidate Findings: """') + len('Candidate Findings: """')
    return user[start:user.index('"""', start)]


def _handler(judge: FakeJudge) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            candidate = _candidate(body)
            with judge.lock:
                headers = {k.lower(): v for k, v in self.headers.items()}
                judge.requests.append({"path": self.path, "headers": headers, "body": body,
                                       "candidate": candidate, "time": time.monotonic()})
            action = judge.act(candidate)
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("answer", action[2])
            elif action[0] == "wait":  # ("wait", threading.Event, answer): in flight until the test says so
                action[1].wait(timeout=30)
                action = ("answer", action[2])
            if action[0] == "status":  # ("status", code[, headers[, body]])
                self._send(action[1], action[3] if len(action) > 3 else
                           {"error": {"message": "scripted failure", "type": "scripted"}},
                           action[2] if len(action) > 2 else {})
            elif action[0] == "raw":  # ("raw", content type, body bytes): what a broken server sends
                self._send_bytes(200, action[2], {"Content-Type": action[1]})
            elif action[0] == "content":  # ("content", any JSON value) in the message's content field
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": action[1]}}]})
            else:
                self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                 "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": action[1]}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def _send(self, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send_bytes(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _send_bytes(self, code: int, data: bytes, headers: dict[str, str]) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and hung up (the "slow" script): nothing left to tell it

    return Handler


@pytest.fixture
def fake_judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJudge]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = FakeJudge()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(judge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    judge.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield judge
    server.shutdown()
    server.server_close()


def config(judge: FakeJudge, tmp_path: Path, **overrides: Any) -> JudgeConfig:
    settings: dict[str, Any] = dict(model="judge-test", endpoint=judge.url + "/v1", prompt="radtrt",
                                    requests_per_minute=0, concurrency=2, max_attempts=3, backoff_initial_s=0.01,
                                    backoff_max_s=0.05, timeout_s=0.3, cache_path=tmp_path / "judge.sqlite")
    settings.update(overrides)
    return JudgeConfig(**settings)


def pairs(*candidates: str) -> list[ReportPair]:
    return [ReportPair(study=f"s{i}", reference="Small left pleural effusion.", prediction=c)
            for i, c in enumerate(candidates)]


def run_judge(cfg: JudgeConfig, items: list[ReportPair], **kw: Any) -> list[Judgement]:
    judge = Judge(cfg, **kw)
    try:
        return judge.judge(items, show_progress=False)
    finally:
        judge.cache.close()


def test_scores_reports_with_published_settings(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.scripts = {"one": [("answer", answer((1, 0, 0, 0, 0, 0)))],
                          "two": [("answer", answer((0, 2, 0, 0, 0, 0), (0, 0, 1, 0, 0, 0)))]}
    cfg = EvalConfig(metrics=("chexprompt",), judge=config(fake_judge, tmp_path),
                     bootstrap=BootstrapConfig(n_resamples=100), show_progress=False)
    report = evaluate(pairs("one", "two", "three"), cfg)
    assert [j.counts.total_significant for j in report.judgements] == [1, 2, 0]
    summary = report.chexprompt
    assert summary.n_scored == 3 and summary.failures == {}
    assert summary.mean_significant.value == pytest.approx(1.0)
    assert summary.mean_insignificant.value == pytest.approx(1 / 3)
    assert summary.per_type_significant["B"].value == pytest.approx(2 / 3)
    assert summary.share_without_significant.value == pytest.approx(1 / 3)
    assert "not the published" in summary.judge
    request = fake_judge.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert request["body"]["temperature"] == 0 and request["body"]["max_tokens"] == 128
    assert request["body"]["model"] == "judge-test"
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    assert KEY not in json.dumps(report.to_json())


def test_retries_rate_limits_server_errors_and_timeouts(fake_judge: FakeJudge, tmp_path: Path) -> None:
    good = answer((0, 0, 1, 0, 0, 0))
    fake_judge.scripts = {"limited": [("status", 429, {"retry-after-ms": "20"}), ("answer", good)],
                          "broken": [("status", 500), ("status", 503), ("answer", good)],
                          "slow": [("sleep", 0.6, good), ("answer", good)]}
    cfg = config(fake_judge, tmp_path, concurrency=1)
    sleeps: list[float] = []
    results = run_judge(cfg, pairs("limited", "broken", "slow"),
                        client=OpenAIJudgeClient(cfg, sleep=sleeps.append))
    assert all(j.counts is not None and j.counts.significant[2] == 1 for j in results)
    assert [fake_judge.count(c) for c in ("limited", "broken", "slow")] == [2, 3, 2]
    assert sleeps[0] == pytest.approx(0.02)  # the server's retry-after-ms was honoured
    assert len(sleeps) == 4 and all(0 <= s <= cfg.backoff_max_s for s in sleeps)


def test_failures_are_recorded_not_zero_and_a_rerun_resumes(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.scripts = {"down": [("status", 500)] * 3}
    cfg = config(fake_judge, tmp_path)
    items = pairs("down", "fine")
    first = run_judge(cfg, items)
    assert first[0].counts is None and first[0].failure == "request failed: HTTP 500: scripted failure"
    assert first[1].counts == ErrorCounts(ZERO, ZERO) and not first[1].cached
    asked = len(fake_judge.requests)
    second = run_judge(cfg, items)  # the server now answers "down" too (script used up)
    assert len(fake_judge.requests) == asked + 1 and fake_judge.count("down") == 4
    assert second[0].counts is not None and second[1].cached


def test_unparseable_answer_is_a_failure_and_left_out_of_means(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.scripts = {"chatty": [("answer", "The candidate looks fine to me.")],
                          "bad": [("answer", answer((3, 0, 0, 0, 0, 0)))]}
    cfg = EvalConfig(metrics=("chexprompt",), judge=config(fake_judge, tmp_path),
                     bootstrap=BootstrapConfig(n_resamples=100), show_progress=False)
    report = evaluate(pairs("chatty", "bad"), cfg)
    chatty = report.judgements[0]
    assert chatty.counts is None and chatty.failure.startswith("unparseable answer")
    assert chatty.answer == "The candidate looks fine to me."
    assert report.chexprompt.n_scored == 1 and report.chexprompt.failures == {"unparseable answer": 1}
    assert report.chexprompt.mean_significant.value == pytest.approx(3.0)  # not (3 + 0) / 2
    again = evaluate(pairs("chatty", "bad"), cfg)  # unreadable answers are not cached: asked again
    assert fake_judge.count("chatty") == 2 and not again.judgements[0].cached and again.judgements[1].cached


@pytest.mark.parametrize("action, failure", [
    (("answer", answer().replace("(A, 0)", "(A, \u00b2)")), "unparseable answer"),  # a digit int() refuses
    (("answer", answer().replace("(A, 0)", "(A, 99999999999)")), "unparseable answer"),
    (("raw", "application/json", b'{"id": "x", "choices": [{"mess'), "request failed: unreadable response body"),
    (("raw", "text/plain", b"upstream says hello"), "request failed: the response is not a chat completion"),
    (("raw", "application/json", b'{"choices": "abc"}'), "request failed: the response is not a chat completion"),
    (("raw", "application/json", b"\xff\xfe{}"), "request failed: unreadable response body"),
    # nested too deeply for json.loads: a RecursionError traceback, exit 1
    (("raw", "application/json", b"[" * 100_000 + b"]" * 100_000), "request failed: unreadable response body"),
    (("content", ["a list"]), "request failed: the answer's content is not text"),
    (("content", None), "unparseable answer"),
])
def test_a_broken_answer_fails_its_report_not_the_run(fake_judge: FakeJudge, tmp_path: Path, action: Action,
                                                      failure: str) -> None:
    """Each of these used to end the whole run in a traceback (and the cached ones on every rerun)."""
    fake_judge.scripts = {"broken": [action]}
    cfg = config(fake_judge, tmp_path, max_attempts=1)
    first = run_judge(cfg, pairs("broken", "fine"))
    assert first[0].counts is None and first[0].failure.startswith(failure) and first[1].counts is not None
    second = run_judge(cfg, pairs("broken", "fine"))  # nothing of the broken answer was cached
    assert fake_judge.count("broken") == 2 and second[0].counts is not None and second[1].cached


def test_a_huge_unreadable_answer_is_kept_cut(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.scripts = {"huge": [("answer", "x" * 1_000_000)]}
    (judged,) = run_judge(config(fake_judge, tmp_path), pairs("huge"))
    assert judged.failure.startswith("unparseable answer") and len(judged.answer) < 5000


def test_unreadable_answers_in_a_row_stop_the_run(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.default = lambda candidate: ("answer", "I cannot judge this.")
    with pytest.raises(RadtrtError, match="failed 3 reports in a row .*unparseable answer") as e:
        run_judge(config(fake_judge, tmp_path, max_consecutive_failures=3, concurrency=1), pairs(*"abcdef"))
    assert len(fake_judge.requests) <= 4  # the run stopped: at most the one request in flight went on
    # "rerun to resume": at temperature 0 the rerun got the same answers
    assert "rerun to resume" not in str(e.value) and "--judge-model" in str(e.value) and "--judge-prompt" in str(e.value)


def test_cache_is_keyed_by_model_and_prompt_and_stores_no_reports(fake_judge: FakeJudge, tmp_path: Path) -> None:
    items = pairs("CANDIDATE-ALPHA", "CANDIDATE-BETA")
    run_judge(config(fake_judge, tmp_path), items)
    run_judge(config(fake_judge, tmp_path), items)
    assert len(fake_judge.requests) == 2
    run_judge(config(fake_judge, tmp_path, model="judge-other"), items)
    assert len(fake_judge.requests) == 4
    # the same model name served elsewhere is another judge (a different URL to the same fake server here)
    run_judge(config(fake_judge, tmp_path, endpoint=fake_judge.url.replace("127.0.0.1", "localhost") + "/v1"), items)
    assert len(fake_judge.requests) == 6
    run_judge(config(fake_judge, tmp_path), pairs("CANDIDATE-ALPHA", "CANDIDATE-GAMMA"))
    assert len(fake_judge.requests) == 7
    stored = (tmp_path / "judge.sqlite").read_bytes()
    assert b"CANDIDATE" not in stored and b"pleural" not in stored and KEY.encode() not in stored


def test_a_trailing_slash_on_the_endpoint_is_the_same_judge(fake_judge: FakeJudge, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key hashed the URL as typed: "/v1/" asked (and paid for) every report "/v1" had cached."""
    import hashlib

    written = hashlib.sha256(f"openai {fake_judge.url}/v1".encode()).hexdigest()[:16]  # the key of older radtrt
    assert config(fake_judge, tmp_path, endpoint=fake_judge.url + "/v1/").cache_identity == f"judge-test @{written}"
    items = pairs("CANDIDATE-ALPHA", "CANDIDATE-BETA")
    run_judge(config(fake_judge, tmp_path), items)
    run_judge(config(fake_judge, tmp_path, endpoint=fake_judge.url + "/v1/"), items)
    assert len(fake_judge.requests) == 2
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    azure = {"endpoint": None, "api_version": "2024-06-01", "model": "gpt4-judge"}
    run_judge(config(fake_judge, tmp_path, azure_endpoint=fake_judge.url, **azure), items)
    run_judge(config(fake_judge, tmp_path, azure_endpoint=fake_judge.url + "/", **azure), items)
    assert len(fake_judge.requests) == 4


def test_a_cache_that_cannot_be_written_is_refused_when_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only cache file opened and was read; the first answer's store failed, after the paid requests had been
    sent, with 'another radtrt eval using it?' as the guess."""
    import sqlite3

    from radtrt.evaluation.chexprompt import cache as cache_module
    from radtrt.evaluation.chexprompt.cache import JudgeCache

    path = tmp_path / "judge.sqlite"
    with JudgeCache(path) as cache:
        cache.put("judge", "k", "answer")
        assert len(cache) == 1  # the write probe left no row of its own
    before = path.read_bytes()
    real_connect = sqlite3.connect

    def read_only(database: Path, **kwargs: Any) -> sqlite3.Connection:  # a read-only file, even for root
        return real_connect(f"file:{database}?mode=ro", uri=True, **kwargs)

    monkeypatch.setattr(cache_module.sqlite3, "connect", read_only)
    with pytest.raises(RadtrtError, match=f"^the judge cache {path} cannot be written \\(attempt to write a readonly "
                                          f"database\\); make it writable, or give --judge-cache another file$"):
        JudgeCache(path)
    assert path.read_bytes() == before


def test_another_programs_database_is_not_taken_for_the_cache(tmp_path: Path) -> None:
    """--judge-cache naming another SQLite database silently added radtrt's table to it."""
    import sqlite3

    from radtrt.evaluation.chexprompt.cache import JudgeCache

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    db.close()
    before = other.read_bytes()
    with pytest.raises(RadtrtError, match="is another program's SQLite database .*none of them radtrt's 'answers'"):
        JudgeCache(other)
    assert other.read_bytes() == before
    views = tmp_path / "views.db"  # a view but no table: passed the first check
    with sqlite3.connect(views) as db:
        db.execute("CREATE VIEW v AS SELECT 1")
    db.close()
    with pytest.raises(RadtrtError, match="is another program's SQLite database"):
        JudgeCache(views)
    # a folder ("unable to open database file") and a text file ("file is not a database") said in words
    with pytest.raises(RadtrtError, match=f"^--judge-cache {tmp_path} is a folder; give the judge cache's file"):
        JudgeCache(tmp_path)
    with pytest.raises(RadtrtError, match="^--judge-cache /dev/null is not a regular file"):  # "disk I/O error"
        JudgeCache(Path("/dev/null"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RadtrtError, match=f"afile/sub/c.sqlite: {tmp_path / 'afile'} is not a folder"):
        JudgeCache(tmp_path / "afile" / "sub" / "c.sqlite")
    locked = tmp_path / "locked" / "c.sqlite"  # in a folder this user cannot enter (root can: stat is made to fail)

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "is_dir", denied)
        with pytest.raises(RadtrtError, match=f"^cannot open the judge cache {locked}: Permission denied$"):
            JudgeCache(locked)
    text = tmp_path / "predictions.jsonl"
    text.write_text('{"study": "s", "reference": "r", "prediction": "p"}\n' * 100)
    with pytest.raises(RadtrtError, match=r"predictions.jsonl: it is not a SQLite database \(give --judge-cache a new "):
        JudgeCache(text)
    with JudgeCache(tmp_path / "new.sqlite") as fresh:  # a new file, and then radtrt's own, still open
        fresh.put("m", "k", "answer")
    with JudgeCache(tmp_path / "new.sqlite") as again:
        assert again.get("m", "k") == "answer"


def test_rate_limiter_spaces_request_starts() -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire()
    assert sleeps == [pytest.approx(0.5), pytest.approx(1.0)]
    unlimited = RateLimiter(0, clock=lambda: now[0], sleep=sleep)
    unlimited.acquire()
    assert len(sleeps) == 2


def test_rate_limit_holds_across_concurrent_workers(fake_judge: FakeJudge, tmp_path: Path) -> None:
    run_judge(config(fake_judge, tmp_path, requests_per_minute=600, concurrency=4), pairs(*"abcde"))
    times = sorted(r["time"] for r in fake_judge.requests)
    assert len(times) == 5
    # 600/min: one start per 0.1 s, so five starts span at least 0.4 s even with four workers
    # (a little is allowed for the first request reaching the server later than it left).
    assert times[-1] - times[0] >= 0.3


def test_rejected_key_stops_the_run_without_echoing_it(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.default = lambda candidate: ("status", 401)
    with pytest.raises(RadtrtError) as info:
        run_judge(config(fake_judge, tmp_path), pairs("x", "y"))
    assert "HTTP 401" in str(info.value) and KEY not in str(info.value)


def test_a_stopped_run_caches_the_answers_in_flight_and_retries_no_more(fake_judge: FakeJudge,
                                                                        tmp_path: Path) -> None:
    """An interrupted or fatally stopped run kept retrying in its workers for minutes, and dropped the answers
    that arrived meanwhile: paid for, then asked again on the rerun."""
    fake_judge.scripts = {"slow": [("sleep", 0.5, answer())]}
    fake_judge.default = lambda candidate: ("status", 401) if candidate == "bad" else ("status", 500)
    cfg = config(fake_judge, tmp_path, concurrency=3, max_attempts=6, timeout_s=5, backoff_initial_s=1.0,
                 backoff_max_s=2.0)
    with pytest.raises(RadtrtError, match="HTTP 401"):
        run_judge(cfg, pairs("slow", "bad", "down"))
    assert fake_judge.count("down") == 1  # its backoff pause ended with the run, and no attempt followed
    fake_judge.default = lambda candidate: ("answer", answer())
    again = run_judge(cfg, pairs("slow", "bad", "down"))
    assert again[0].cached and fake_judge.count("slow") == 1


def test_a_rejected_key_promises_no_cached_answers_from_requests_in_flight(fake_judge: FakeJudge,
                                                                          tmp_path: Path) -> None:
    """After a 401 stderr said the requests in flight would have their answers cached: they get a 401 too."""
    import io
    import threading

    from rich.console import Console

    release = threading.Event()  # "slow" stays in flight until the stop has been said (no race with a sleep)

    class Stderr(io.StringIO):
        def write(self, text: str) -> int:
            if "stopping" in text:
                release.set()
            return super().write(text)

    fake_judge.scripts = {"slow": [("wait", release, answer())]}
    fake_judge.default = lambda candidate: ("status", 401)
    out = Stderr()
    judge = Judge(config(fake_judge, tmp_path, concurrency=2, timeout_s=60))
    try:
        with pytest.raises(RadtrtError, match="HTTP 401"):
            judge.judge(pairs("slow", "bad"), show_progress=False, console=Console(file=out))
    finally:
        release.set()
        judge.cache.close()
    assert "waiting for 1 judge request(s) in flight" in out.getvalue() and "cached" not in out.getvalue()


REFUSAL = ("Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' "
           f"instead.\nYour key {KEY} was fine. " + "padding " * 40)


def test_a_refused_request_shows_the_server_message_and_suggests_no_rerun(fake_judge: FakeJudge,
                                                                         tmp_path: Path) -> None:
    """A 400 (an OpenAI reasoning model rejecting max_tokens) read "HTTP 400", then "rerun the same command", which
    sends the same request again."""
    fake_judge.default = lambda c: ("status", 400, {}, {"error": {"message": REFUSAL, "type": "invalid_request"}})
    preds = _write(tmp_path / "p.jsonl", ["Report A.", "Report B."])
    result = _eval_cli([
        "eval", "--predictions", str(preds), "--metrics", "chexprompt", "--endpoint", fake_judge.url + "/v1",
        "--judge-model", "judge-test", "--judge-prompt", "radtrt", "--judge-cache", str(tmp_path / "c.sqlite"),
        "--requests-per-minute", "0", "--timeout", "2", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert len(fake_judge.requests) == 2  # a 400 is not retried
    line = result.stderr.strip()
    assert "HTTP 400: Unsupported parameter: 'max_tokens' is not supported" in line and len(line.splitlines()) == 1
    assert "rerun the same command" not in line and "--judge-model" in line and "--endpoint" in line
    # the reasons table counts by status; the server's message is shown once, as an example, cut short
    assert "Not scored (left out of the means): request failed: HTTP 400: 2." in result.stdout
    assert "The server said, first for HTTP 400: Unsupported parameter" in result.stdout
    assert KEY not in result.stdout + result.stderr and "Your key [key] was fine" in result.stdout
    assert "padding " * 30 not in result.stdout


def test_a_server_message_quoting_the_report_stays_off_stderr_and_the_results(fake_judge: FakeJudge,
                                                                                tmp_path: Path) -> None:
    """A validation error echoing its input put the candidate report on stderr ("HTTP 401: invalid input:
    Candidate Findings: ...")."""
    fake_judge.default = lambda c: ("status", 401, {}, {"error": {"message": f"invalid input: {c}"}})
    preds = _write(tmp_path / "p.jsonl", ["Right lower lobe consolidation.", "Small left effusion."])
    result = _eval_cli([
        "eval", "--predictions", str(preds), "--metrics", "chexprompt", "--endpoint", fake_judge.url + "/v1",
        "--judge-model", "judge-test", "--judge-prompt", "radtrt", "--judge-cache", str(tmp_path / "c.sqlite"),
        "--requests-per-minute", "0", "--timeout", "2", "--no-progress", "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "HTTP 401: its message quotes the request" in result.stderr
    assert "consolidation" not in result.stderr + result.stdout and "effusion" not in result.stderr + result.stdout


def test_a_partly_judged_run_says_so_on_stderr(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """Reports left unscored were counted on standard output only, with exit 0 and nothing on stderr, and nothing
    said that a rerun would ask again for the failed requests (not for the unreadable answers)."""
    fake_judge.default = lambda c: (("status", 500, {}, {"error": {"message": "overloaded"}}) if c == "Report B." else
                                    ("answer", "no counts here") if c == "Report C." else ("answer", answer()))
    preds = _write(tmp_path / "p.jsonl", ["Report A.", "Report B.", "Report C.", "Report D."])
    result = _eval_cli([
        "eval", "--predictions", str(preds), "--metrics", "chexprompt", "--endpoint", fake_judge.url + "/v1",
        "--judge-model", "judge-test", "--judge-prompt", "radtrt", "--judge-cache", str(tmp_path / "c.sqlite"),
        "--requests-per-minute", "0", "--timeout", "2", "--no-progress", "--max-attempts", "1"])
    assert result.exit_code == 0, result.stderr
    assert " ".join(result.stderr.split()) == (
        "warning: CheXprompt left 2 of 4 reports unscored (out of its means; the reasons are in the summary): rerun "
        "the same command to ask again for the 1 whose requests failed (the answers already given are cached)")


def test_failures_are_counted_by_status_and_bodies_without_a_message_are_not_shown() -> None:
    """The server's message made each failure a tally row of its own ('try again in 600ms', '... in 1.2s'), and a
    body without a message (a validation error listing the request's fields) was shown whole, report text and all."""
    from types import SimpleNamespace

    from radtrt.evaluation.chexprompt.client import server_message
    from radtrt.evaluation.chexprompt.summary import summarize

    failures = ["request failed: HTTP 429: try again in 600ms", "request failed: HTTP 429: try again in 1.2s",
                "request failed: HTTP 500", "unparseable answer: no counts"]
    summary = summarize([Judgement(f"s{i}", None, f, None, False) for i, f in enumerate(failures)], "radtrt",
                        False, "judge", BootstrapConfig(n_resamples=10, seed=0))
    assert summary.failures == {"request failed: HTTP 429": 2, "request failed: HTTP 500": 1,
                                "unparseable answer": 1}
    assert summary.failure_examples == {"request failed: HTTP 429": failures[0]}
    # what server_message reads of the SDK's error: its parsed body
    echo = SimpleNamespace(body={"detail": [{"loc": ["messages"], "input": "Small left effusion."}]})
    assert server_message(echo) is None  # type: ignore[arg-type]
    for page in ("<html><body>400 Bad Request: Small left effusion.</body></html>", "Small left effusion."):
        assert server_message(SimpleNamespace(body=page)) is None  # type: ignore[arg-type]  # not JSON: not shown
    assert server_message(SimpleNamespace(body={"message": "max_tokens is not supported"})) == (  # type: ignore[arg-type]
        "max_tokens is not supported")
    # a message that repeats what was sent (FastAPI's 422 and proxies quote their input) is not shown either
    sent = 'Reference Findings: """Small left effusion.""" Candidate Findings: """Right lower lobe consolidation."""'
    quoting = SimpleNamespace(body={"message": 'invalid input: Candidate Findings: """Right lower lobe consol'})
    assert server_message(quoting, sent) == "its message quotes the request, which holds clinical text: not shown"  # type: ignore[arg-type]
    assert server_message(quoting) is not None  # type: ignore[arg-type]  # nothing sent to compare with
    assert server_message(SimpleNamespace(body={"message": "max_tokens is not supported"}), sent) == (  # type: ignore[arg-type]
        "max_tokens is not supported")


def test_refused_requests_in_a_row_do_not_say_rerun(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.default = lambda candidate: ("status", 422, {}, {"detail": "field required"})
    cfg = config(fake_judge, tmp_path, concurrency=1, max_consecutive_failures=2)
    with pytest.raises(RadtrtError, match="HTTP 422: field required.*a rerun fails the same way") as err:
        run_judge(cfg, pairs("a", "b", "c", "d"))
    assert "rerun to resume" not in str(err.value)
    # a streak of server errors ending in one refusal is no proof a rerun fails the same way
    fake_judge.default = lambda candidate: ("status", 422, {}, {"detail": "field required"}) if candidate == "b" \
        else ("status", 500)
    with pytest.raises(RadtrtError, match="HTTP 422: field required.*rerun to resume"):
        run_judge(config(fake_judge, tmp_path, concurrency=1, max_consecutive_failures=2, max_attempts=1),
                  pairs("a", "b", "c"))


def test_a_stopped_run_starts_no_request_waiting_for_the_rate_limit(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """Workers waiting for a rate-limit slot when the run stopped sent their requests anyway, one a second."""
    fake_judge.default = lambda candidate: ("status", 401)  # whichever worker gets the first slot
    cfg = config(fake_judge, tmp_path, concurrency=4, requests_per_minute=60)
    start = time.monotonic()
    with pytest.raises(RadtrtError, match="HTTP 401"):
        run_judge(cfg, pairs("bad", "x", "y", "z"))
    assert len(fake_judge.requests) == 1 and time.monotonic() - start < 0.9


def test_endpoint_down_stops_after_consecutive_failures(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.scripts = {"first": [("answer", answer())]}
    fake_judge.default = lambda candidate: ("status", 502)
    cfg = config(fake_judge, tmp_path, concurrency=1, max_attempts=1, max_consecutive_failures=2)
    with pytest.raises(RadtrtError, match="rerun to resume"):
        run_judge(cfg, pairs("first", "b", "c", "d", "e", "f"))
    assert len(fake_judge.requests) < 6
    fake_judge.default = lambda candidate: ("answer", answer())
    resumed = run_judge(cfg, pairs("first", "b", "c", "d", "e", "f"))
    assert resumed[0].cached and all(j.counts is not None for j in resumed)


def test_missing_key_is_one_clear_line(fake_judge: FakeJudge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RadtrtError, match="set OPENAI_API_KEY"):
        Judge(config(fake_judge, tmp_path))


def test_azure_openai_deployment_path_and_key_header(fake_judge: FakeJudge, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-" + KEY)
    cfg = config(fake_judge, tmp_path, endpoint=None, azure_endpoint=fake_judge.url, model="gpt4-judge",
                 api_version="2024-06-01")
    assert run_judge(cfg, pairs("x"))[0].counts is not None
    request = fake_judge.requests[0]
    assert request["path"] == "/openai/deployments/gpt4-judge/chat/completions?api-version=2024-06-01"
    assert request["headers"]["api-key"] == "azure-" + KEY


def _judgements(sig_totals: list[int | None]) -> list[Judgement]:
    return [Judgement(f"s{i}", None if t is None else ErrorCounts((t, 0, 0, 0, 0, 0), ZERO),
                      None if t is not None else "unparseable answer: x", None, False)
            for i, t in enumerate(sig_totals)]


@pytest.mark.parametrize("reference,candidate,verdict", [
    ([1, 0] * 20, [1, 0] * 20, "pass"),
    ([0] * 40, [1] * 40, "fail"),
    ([0] * 40, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0] * 4, "inconclusive"),
    ([0] * 40, [None, None, None] + [0] * 37, "inconclusive"),
    ([None] * 4, [0] * 4, "inconclusive"),
])
def test_parity_verdicts(reference: list[int | None], candidate: list[int | None], verdict: str) -> None:
    result = parity_from_judgements(_judgements(reference), _judgements(candidate), margin=0.1,
                                    cfg=BootstrapConfig(n_resamples=300))
    assert result.verdict == verdict, result.reason


@pytest.mark.parametrize("n, verdict", [(1, "inconclusive"), (29, "inconclusive"), (30, "pass")])
def test_parity_needs_enough_studies(n: int, verdict: str) -> None:
    """One study gave PASS: every resample identical, a zero-width interval [+0.000, +0.000]."""
    result = parity_from_judgements(_judgements([0] * n), _judgements([0] * n), margin=0.1,
                                    cfg=BootstrapConfig(n_resamples=100))
    assert result.verdict == verdict, result.reason
    if verdict == "inconclusive":
        assert f"only {n} studies" in result.reason and "at least 30" in result.reason


def test_parity_difference_is_paired() -> None:
    # Identical per-study error counts: a paired difference of exactly zero, however noisy the counts.
    counts = [0, 3, 1, 5, 0, 2, 4, 0] * 5
    result = parity_from_judgements(_judgements(counts), _judgements(counts), margin=0.0,
                                    cfg=BootstrapConfig(n_resamples=300))
    assert (result.difference.ci_low, result.difference.ci_high) == (0.0, 0.0) and result.verdict == "pass"
    with pytest.raises(RadtrtError):
        parity_from_judgements(_judgements([0, 1]), _judgements([0]), margin=0.1)


def _eval_cli(args: list[str]) -> Any:
    """``radtrt eval`` with ``args``, through an app holding only the eval command (not the whole CLI)."""
    import typer
    from typer.testing import CliRunner

    from radtrt.evaluation.cli import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Stand-in for the radtrt root app."""

    register(app)
    return CliRunner().invoke(app, args)


def _write(path: Path, predictions: list[str]) -> Path:
    with path.open("w") as fh:
        for i, p in enumerate(predictions):
            fh.write(json.dumps({"study": f"study-{i}", "reference": f"Ground truth {i}.", "prediction": p}) + "\n")
    return path


def test_chexprompt_parity_end_to_end(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.default = lambda c: ("answer", answer((1, 0, 0, 0, 0, 0) if "WORSE" in c else ZERO))
    reference = _write(tmp_path / "torch.jsonl", [f"Report {i}." for i in range(30)])
    same = _write(tmp_path / "same.jsonl", [f"Report {i}." for i in range(30)])
    worse = _write(tmp_path / "worse.jsonl", [f"Report {i}. WORSE" for i in range(30)])
    cfg = config(fake_judge, tmp_path, concurrency=4)
    verdict = chexprompt_parity(reference, same, cfg, margin=0.1, show_progress=False)
    assert verdict.verdict == "pass" and verdict.identical_predictions == 30
    assert len(fake_judge.requests) == 30  # the identical arm came from the cache
    assert verdict.reference_summary.n_scored == 30 and "not the published" in verdict.judge
    verdict = chexprompt_parity(reference, worse, cfg, margin=0.1, show_progress=False)
    assert verdict.verdict == "fail" and verdict.difference.value == pytest.approx(1.0)
    assert json.loads(json.dumps(verdict.to_json()))["verdict"] == "fail"


def test_cli_paired_chexprompt_parity(fake_judge: FakeJudge, tmp_path: Path) -> None:
    fake_judge.default = lambda c: ("answer", answer((1, 0, 0, 0, 0, 0) if "WORSE" in c else ZERO, (0, 1, 0, 0, 0, 0)))
    reference = _write(tmp_path / "torch.jsonl", [f"Report {i}." for i in range(30)])  # the fewest for a PASS
    candidate = _write(tmp_path / "trt.jsonl", [f"Report {i}." for i in range(30)])
    common = ["--metrics", "chexprompt,rouge", "--endpoint", fake_judge.url + "/v1", "--judge-model", "judge-test",
              "--judge-prompt", "radtrt", "--judge-cache", str(tmp_path / "c.sqlite"), "--requests-per-minute", "0",
              "--timeout", "2", "--bootstrap", "100", "--no-progress"]
    result = _eval_cli(["eval", "--paired", str(reference), str(candidate), "-o",
                                      str(tmp_path / "p.json"), *common])
    assert result.exit_code == 0, result.stderr
    assert "CheXprompt parity: **PASS**" in result.stdout and "not the published" in result.stdout
    parity = json.loads((tmp_path / "p.json").read_text())["chexprompt_parity"]
    assert parity["verdict"] == "pass" and parity["identical_predictions"] == 30
    assert parity["candidate"]["mean_insignificant_errors"]["value"] == pytest.approx(1.0)
    assert KEY not in result.stdout + result.stderr + (tmp_path / "p.json").read_text()

    single = _eval_cli(["eval", "--predictions", str(candidate), *common])
    assert single.exit_code == 0, single.stderr
    assert "errors per report" in single.stdout
    assert "| B: omission of a finding | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] |" in single.stdout


def test_a_partly_judged_paired_run_counts_each_arm_once(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """The paired result holds each arm's summary twice (its metrics and the verdict's): '4 of 16 unscored, 1 to
    ask again' for 2 of 8 and 2."""
    fake_judge.default = lambda c: (("status", 500, {}, {"error": {"message": "overloaded"}}) if c.endswith("3.")
                                    else ("answer", answer()))
    reference = _write(tmp_path / "torch.jsonl", ["Ref 0.", "Ref 1.", "Ref 2.", "Ref 3."])
    candidate = _write(tmp_path / "onnx.jsonl", ["Cand 0.", "Cand 1.", "Cand 2.", "Cand 3."])
    result = _eval_cli(["eval", "--paired", str(reference), str(candidate), "--metrics", "chexprompt", "--endpoint",
                        fake_judge.url + "/v1", "--judge-model", "judge-test", "--judge-prompt", "radtrt",
                        "--judge-cache", str(tmp_path / "c.sqlite"), "--requests-per-minute", "0", "--timeout", "2",
                        "--no-progress", "--max-attempts", "1"])
    assert result.exit_code == 0, result.stderr
    assert "CheXprompt left 2 of 8 reports unscored" in result.stderr and "for the 2 whose requests failed" in \
        " ".join(result.stderr.split())


def test_cli_exits_2_when_the_judge_scored_nothing(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """Every request failing (fewer than the consecutive-failure stop) writes the report and exits 2."""
    fake_judge.default = lambda c: ("status", 500)
    preds = _write(tmp_path / "p.jsonl", ["Report A.", "Report B."])
    result = _eval_cli([
        "eval", "--predictions", str(preds), "-o", str(tmp_path / "r.json"), "--metrics", "chexprompt",
        "--endpoint", fake_judge.url + "/v1", "--judge-model", "judge-test", "--judge-prompt", "radtrt",
        "--judge-cache", str(tmp_path / "c.sqlite"), "--requests-per-minute", "0", "--timeout", "2",
        "--max-attempts", "1", "--no-progress"])
    assert result.exit_code == 2 and "scored none of the reports" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())  # the failure table is kept
    assert "Traceback" not in result.stderr


def test_cli_points_at_the_judge_when_no_answer_could_be_read(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """A deterministic judge answering prose: "rerun the same command to ask again" brought the same answers."""
    preds = _write(tmp_path / "p.jsonl", ["Report A.", "Report B."])
    common = ["eval", "--predictions", str(preds), "--metrics", "chexprompt", "--endpoint", fake_judge.url + "/v1",
              "--judge-model", "judge-test", "--judge-prompt", "radtrt", "--judge-cache", str(tmp_path / "c.sqlite"),
              "--requests-per-minute", "0", "--timeout", "2", "--max-attempts", "1", "--no-progress"]
    fake_judge.default = lambda c: ("answer", "I think it's fine.")
    result = _eval_cli(common)
    assert result.exit_code == 2 and "none of the judge's 2 answers could be read" in result.stderr
    assert "rerun the same command" not in result.stderr and "--judge-model" in result.stderr and "--judge-prompt" in result.stderr
    fake_judge.default = lambda c: ("answer", "I think it's fine.") if "A" in c else ("status", 500)
    result = _eval_cli(common)  # a failed request may pass next time: rerunning is the remedy then
    assert result.exit_code == 2 and "rerun the same command to ask again" in result.stderr


def test_nothing_judged_reads_plain_and_paired_results() -> None:
    from radtrt.evaluation.chexprompt.summary import nothing_judged

    scored = {"n_reports": 3, "n_scored": 2}
    assert not nothing_judged({"chexprompt": scored}) and not nothing_judged({"chexprompt": None})
    assert nothing_judged({"chexprompt": {"n_reports": 3, "n_scored": 0}})
    assert nothing_judged({"reference": {"chexprompt": scored}, "candidate": {"chexprompt": {"n_reports": 1,
                                                                                             "n_scored": 0}}})


def test_the_library_never_picks_a_judge_endpoint_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the CLI asked for an endpoint: a library caller's JudgeConfig(model=...) sent the reports to
    api.openai.com, or wherever OPENAI_BASE_URL pointed, without being told so."""
    monkeypatch.setenv("OPENAI_BASE_URL", "http://elsewhere.invalid/v1")
    with pytest.raises(RadtrtError, match="give --endpoint URL"):
        JudgeConfig(model="gpt-4o")
    assert JudgeConfig(model="gpt-4o", endpoint="https://api.openai.com/v1").endpoint == "https://api.openai.com/v1"


@pytest.mark.parametrize("option, url, match", [
    ("endpoint", "http://[::1", "is not a valid URL"),  # the SDK's InvalidURL was a traceback
    ("endpoint", "http://host:notaport/v1", "is not a valid URL"),
    ("endpoint", "http://", "names no host"),  # every request failed, then "rerun"
    ("endpoint", "http://exa mple/v1", "contains a space"),
    ("azure_endpoint", "https://exa mple.openai.azure.com", "--azure-endpoint .* contains a space"),
])
def test_unusable_judge_url_is_refused_before_any_work(option: str, url: str, match: str) -> None:
    with pytest.raises(RadtrtError, match=match):
        JudgeConfig(model="gpt-4o", api_version="2024-06-01" if option == "azure_endpoint" else None,
                    **{option: url})


def test_a_judge_model_name_is_shown_as_typed_on_a_terminal(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """The progress line read the model name as markup: '[/red]' in it was a MarkupError traceback."""
    import io

    from rich.console import Console

    fake_judge.scripts = {"one": [("answer", answer((1, 0, 0, 0, 0, 0)))]}
    out = io.StringIO()
    judge = Judge(config(fake_judge, tmp_path, model="x[/red]"))
    try:
        (result,) = judge.judge(pairs("one"), show_progress=True, console=Console(file=out, force_terminal=True))
    finally:
        judge.cache.close()
    assert result.counts is not None and result.counts.total_significant == 1


def test_a_redirect_stops_the_run_and_is_not_followed(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """The SDK's httpx client followed it, re-sending the API key and the reports to wherever it pointed."""
    fake_judge.default = lambda c: ("status", 307, {"Location": fake_judge.url + "/elsewhere?api-key=SECRET"}, {})
    cfg = config(fake_judge, tmp_path, concurrency=1)
    with pytest.raises(RadtrtError) as err:
        run_judge(cfg, pairs("a", "b", "c"))
    assert str(err.value) == (f"the judge endpoint redirected (HTTP 307) to {fake_judge.url}; give the final URL "
                              f"as --endpoint")
    assert fake_judge.requests and {r["path"] for r in fake_judge.requests} == {"/v1/chat/completions"}


def test_equal_pairs_are_asked_once_and_share_the_answer(fake_judge: FakeJudge, tmp_path: Path) -> None:
    """Each was asked on its own: a judge at temperature 0 may still answer each differently, and the cache
    kept only the last answer, so a rerun from the cache disagreed with the first run."""
    asked = iter(range(100))
    fake_judge.default = lambda c: ("answer", answer((next(asked) % 3, 0, 0, 0, 0, 0)))
    items = [ReportPair(study=f"s{i}", reference="Small left pleural effusion.", prediction=c)
             for i, c in enumerate(["same", "other", "same", "same"])]
    first = run_judge(config(fake_judge, tmp_path), items)
    assert fake_judge.count("same") == 1 and len(fake_judge.requests) == 2
    assert [j.study for j in first] == ["s0", "s1", "s2", "s3"]
    assert first[0].counts == first[2].counts == first[3].counts and not any(j.cached for j in first)
    again = run_judge(config(fake_judge, tmp_path), items)
    assert len(fake_judge.requests) == 2 and all(j.cached for j in again)
    assert [j.counts for j in again] == [j.counts for j in first]


@pytest.mark.parametrize("key, said", [(KEY + "\r", "a line break"),
                                       ("sk-\u00e9-DO-NOT-LOG", "a character that is not ASCII")])
def test_an_api_key_that_cannot_be_sent_is_refused_up_front(fake_judge: FakeJudge, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, key: str,
                                                             said: str) -> None:
    """A trailing \\r was sent as "connection error", retried for every report."""
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with pytest.raises(RadtrtError, match=f"the API key in OPENAI_API_KEY holds {said}") as err:
        OpenAIJudgeClient(config(fake_judge, tmp_path))
    assert "DO-NOT-LOG" not in str(err.value) and not fake_judge.requests
