"""Report synthesis against a scripted OpenAI-compatible server on 127.0.0.1, and the template mode."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from radtrt.data.chat import ChatClient
from radtrt.data.cli import register
from radtrt.data.labeler import extract_labels
from radtrt.data.manifest import read_manifest
from radtrt.data.synthesize import REFUSAL, parse_labels, synthesize, template_text
from radtrt.errors import RadtrtError

KEY = "sk-test-SECRET-0123456789"


class ScriptedServer:
    """Answers POST /v1/chat/completions from a script of (status, headers) or None for success."""

    def __init__(self) -> None:
        self.script: list[tuple | None] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                step = outer.script.pop(0) if outer.script else None
                if step is not None:
                    status, headers, *body = step  # a third item: the body to answer with
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[0] if body else b'{"error": {"message": "scripted failure"}}')
                    return
                labels = body["messages"][1]["content"].split("Positive findings: ")[1].split(".")[0]
                answer = {"choices": [{"message": {"role": "assistant", "content": f" Findings for {labels}. "}}]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = ScriptedServer()
    yield srv
    srv.httpd.shutdown()


def _labels_file(path: Path, n: int = 4) -> Path:
    rows = [{"image": f"img{i}.png", "labels": ["cardiomegaly"] if i % 2 else {"Pneumothorax": 1, "Edema": 0},
             "indication": "Cough." if i == 0 else None, "site": "A"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _client(server: ScriptedServer, cache: Path | None, sleeps: list[float]) -> ChatClient:
    return ChatClient(server.url, "gpt-test", api_key=KEY, rate_per_s=1e9, max_retries=3, backoff_s=0.5,
                      cache_dir=cache, sleep=sleeps.append)


def test_retries_cache_and_key_handling(server: ScriptedServer, tmp_path: Path) -> None:
    server.script = [(429, {"Retry-After": "0"}), (503, {})]
    sleeps: list[float] = []
    out = synthesize(_labels_file(tmp_path / "labels.jsonl"), tmp_path / "out.jsonl",
                     client=_client(server, tmp_path / "cache", sleeps), console=None)
    rows = read_manifest(out)
    assert [r.image for r in rows] == [f"img{i}.png" for i in range(4)]
    assert rows[1].findings == "Findings for cardiomegaly." and rows[1].labels == ("cardiomegaly",)
    assert rows[0].labels == ("Pneumothorax",) and rows[0].indication == "Cough."
    assert rows[0].extra["synthesis"]["mode"] == "llm" and rows[0].extra["site"] == "A"
    assert len(server.requests) == 5  # 2 failures + 3 distinct prompts (rows 1 and 3 are equal: cached)
    assert 0.0 in sleeps and 1.0 in sleeps  # Retry-After honoured, then backoff 0.5 * 2**1
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "gpt-test" for r in server.requests)
    assert "Indication: Cough." in server.requests[2]["body"]["messages"][1]["content"]
    assert "Absent" in server.requests[2]["body"]["messages"][1]["content"]  # Edema: 0
    stored = out.read_text() + "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert KEY not in stored
    # a fresh output with the same cache asks the endpoint nothing
    again = synthesize(tmp_path / "labels.jsonl", tmp_path / "out2.jsonl",
                       client=_client(server, tmp_path / "cache", sleeps), console=None)
    assert len(server.requests) == 5 and again.read_text() == out.read_text()


@pytest.mark.parametrize("refusal", ["I'm sorry, but I can't help with that.", "I can\u2019t assist with this request.",
                                     "As an AI language model, I cannot provide medical reports.",
                                     "I apologize, but I cannot write this.", "Unfortunately, I can't do that."])
def test_a_refusal_is_never_written_as_findings(refusal: str, server: ScriptedServer, tmp_path: Path) -> None:
    """A chat model's refusal was written as the row's findings with exit 0, and training took it for a report."""
    labels = _labels_file(tmp_path / "labels.jsonl", n=3)
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": refusal}}]}).encode()
    server.script = [None, (200, {"Content-Type": "application/json"}, answer)]
    cache = tmp_path / "cache"
    with pytest.raises(RadtrtError, match=rf"labels.jsonl:2: the chat model declined to write findings .*; the 1 row "
                                          rf"before it is kept in {tmp_path / 'out.jsonl.partial'}; at --temperature 0 "
                                          rf"a rerun is likely to get the same answer \(it is not cached\): use a chat "
                                          rf"model that writes reports \(--model\) \(with another, delete") as e:
        synthesize(labels, tmp_path / "out.jsonl", client=_client(server, cache, []), console=None)
    assert refusal not in str(e.value) and "Cough" not in str(e.value)
    assert "reword that row's indication" not in str(e.value)  # row 2 has none
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()
    # the rerun asks again (a cached refusal was replayed by every rerun) and completes the manifest
    synthesize(labels, tmp_path / "out.jsonl", client=_client(server, cache, []), console=None)
    assert [r.findings for r in read_manifest(tmp_path / "out.jsonl")][1] == "Findings for cardiomegaly."
    # findings in a radiologist's first person are findings
    for text in ("I cannot exclude a small left apical pneumothorax.", "No pneumothorax. I cannot exclude a small "
                 "effusion.", "Sorrylike opacity", "I am unable to exclude a small effusion.",
                 "Unfortunately the lateral view was not obtained."):
        assert not REFUSAL.match(text), text


def test_a_missing_label_file_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(RadtrtError, match=f"^label file not found: {tmp_path / 'labels.jsonl'}$"):  # "manifest"
        synthesize(tmp_path / "labels.jsonl", tmp_path / "out.jsonl", client=None, console=None)


def test_resumes_after_a_failure(server: ScriptedServer, tmp_path: Path) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl", n=5)
    server.script = [None, None, (400, {})]
    with pytest.raises(RadtrtError, match="HTTP 400") as info:
        synthesize(labels, tmp_path / "out.jsonl", client=_client(server, None, []), console=None)
    assert KEY not in str(info.value) and str(info.value).endswith("HTTP 400: scripted failure")
    # the first rows wait apart: under the final name they read as a whole (shorter) manifest
    partial = tmp_path / "out.jsonl.partial"
    assert not (tmp_path / "out.jsonl").exists() and len(partial.read_text().splitlines()) == 2
    with partial.open("a") as f:
        f.write('{"image": "img2.png", "find')  # a run killed mid-line
    synthesize(labels, tmp_path / "out.jsonl", client=_client(server, None, []), console=None)
    assert [r.image for r in read_manifest(tmp_path / "out.jsonl")] == [f"img{i}.png" for i in range(5)]
    assert len(server.requests) == 3 + 3 and not partial.exists()  # only rows 2..4 asked again
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"image": "zzz.png", "labels": []}) + "\n")
    with pytest.raises(RadtrtError, match="other images"):
        synthesize(other, tmp_path / "out.jsonl", client=None, console=None)


def test_a_manifest_short_of_its_label_file_is_completed_apart(server: ScriptedServer, tmp_path: Path) -> None:
    """A manifest an older radtrt left unfinished in place, or one whose label file grew since, is moved to
    OUT.partial and completed there: appended in place, a stopped run left it short under its name."""
    labels = _labels_file(tmp_path / "labels.jsonl", n=3)
    whole = synthesize(labels, tmp_path / "whole.jsonl", client=None, console=None).read_text().splitlines()
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    out.write_text(whole[0] + "\n")
    synthesize(labels, out, client=None, console=None)
    assert out.read_text().splitlines() == whole and not partial.exists()
    grown, asked = tmp_path / "grown.jsonl", tmp_path / "asked.jsonl"
    server.script = [None, None]
    synthesize(_labels_file(tmp_path / "two.jsonl", n=2), asked, client=_client(server, None, []), console=None)
    server.script = [(400, {})]  # the label file grew by a row, whose request fails
    with pytest.raises(RadtrtError, match="HTTP 400"):
        synthesize(_labels_file(grown, n=3), asked, client=_client(server, None, []), console=None)
    assert not asked.exists() and len(asked.with_name("asked.jsonl.partial").read_text().splitlines()) == 2
    partial.write_text(whole[0] + "\n")
    out.write_text(whole[0] + "\n")
    with pytest.raises(RadtrtError, match="both .*out.jsonl and .*out.jsonl.partial exist"):
        synthesize(labels, out, client=None, console=None)
    with pytest.raises(RadtrtError, match="unfinished manifest .*out.jsonl.partial is the label file itself"):
        synthesize(partial, out, client=None, console=None)


def test_a_refused_output_file_is_left_as_it_was(tmp_path: Path) -> None:
    """An existing -o that is not a manifest is refused before anything in it changes (no partial-row trim)."""
    labels = _labels_file(tmp_path / "labels.jsonl", n=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\nline two without its newline")
    binary = tmp_path / "b.dat"
    binary.write_bytes(b"\xff\xfe\x00garbage\n" + bytes(range(256)))
    one_line = tmp_path / "results.json"
    one_line.write_text('{"precious": "work"}')  # json.dump's output: one line, no newline; it was emptied
    for path, match in ((notes, "not valid JSON"), (binary, "not UTF-8"), (one_line, "holds no finished manifest row")):
        before = path.read_bytes()
        with pytest.raises(RadtrtError, match=match):
            synthesize(labels, path, client=None, console=None)
        assert path.read_bytes() == before


def test_gives_up_after_retries(server: ScriptedServer, tmp_path: Path) -> None:
    server.script = [(500, {})] * 4
    sleeps: list[float] = []
    with pytest.raises(RadtrtError, match="failed 4 times .*HTTP 500"):
        _client(server, None, sleeps).complete([{"role": "user", "content": "Positive findings: x."}])
    assert sleeps == [0.5, 1.0, 2.0]
    server.script = [(500, {})]
    client = ChatClient(server.url, "gpt-test", api_key=KEY, rate_per_s=1e9, max_retries=0, sleep=sleeps.append)
    with pytest.raises(RadtrtError, match=r"chat endpoint failed once \(last: HTTP 500\)"):  # was "1 times"
        client.complete([{"role": "user", "content": "Positive findings: x."}])


def test_template_mode_is_deterministic_and_marked(tmp_path: Path) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl")
    a = synthesize(labels, tmp_path / "a.jsonl", client=None, seed=1, console=None)
    b = synthesize(labels, tmp_path / "b.jsonl", client=None, seed=1, console=None)
    assert a.read_text() == b.read_text()
    rows = read_manifest(a)
    assert all(r.extra["synthesis"]["mode"] == "template" for r in rows)
    assert rows[0].findings == "There is a pneumothorax. No pulmonary edema."
    assert extract_labels(rows[1].findings) == ["cardiomegaly"]  # phantom vocabulary: the varied generator


@pytest.mark.parametrize("labels, expected", [
    ({"Pneumonia": -1, "Edema": 0}, ()),  # was ("no_finding",) next to "Pneumonia is possible."
    ({"No Finding": 0, "Edema": -1}, ()),  # No Finding negated (alone, template mode refuses it: see below)
    ({"Edema": 0, "Fracture": None}, ("no_finding",)),  # only negatives: CheXpert's No Finding
    ({"Edema": 1, "Pneumonia": -1}, ("Edema",)),
    ({"Support Devices": 1, "Edema": 0}, ("Support Devices", "no_finding")),  # CheXpert's rule ignores devices
    ({"Support Devices": 1, "No Finding": 1}, ("Support Devices", "No Finding")),
    ({"Support Devices": 1, "Pneumonia": -1}, ("Support Devices",)),
    ({"Support Devices": -1}, ("no_finding",)),  # an uncertain device is no finding either
    ({"No Finding": 1, "Support Devices": -1}, ("No Finding",)),  # a CheXpert row it refused
    ({"Support Devices": 1, "Edema": 1}, ("Support Devices", "Edema")),
])
def test_no_finding_only_when_nothing_is_positive_or_uncertain(tmp_path: Path, labels: dict,
                                                                expected: tuple[str, ...]) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"image": "a", "labels": labels}) + "\n")
    row = read_manifest(synthesize(path, tmp_path / "out.jsonl", client=None, console=None))[0]
    assert row.labels == expected, row.findings


def test_devices_alone_are_labelled_as_the_phantom_labeler_reads_their_text(tmp_path: Path) -> None:
    """A devices-only row got no no_finding, while the labeler gives it to the text written for that row."""
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"image": "a", "labels": ["central_line"]}) + "\n")
    row = read_manifest(synthesize(path, tmp_path / "out.jsonl", client=None, console=None))[0]
    assert set(row.labels) == set(extract_labels(row.findings)) == {"central_line", "no_finding"}


def test_no_finding_beside_uncertain_findings_is_refused(tmp_path: Path) -> None:
    """It was accepted, and the text said both "No acute cardiopulmonary abnormality." and "Pneumonia is possible."."""
    with pytest.raises(RadtrtError, match="x: 'No Finding' is positive together with uncertain findings"):
        parse_labels({"No Finding": 1, "Pneumonia": -1}, "x")
    assert parse_labels({"No Finding": 1, "Support Devices": 1}, "x").positive == ("No Finding", "Support Devices")


def test_indication_that_is_no_string_is_refused(tmp_path: Path) -> None:
    """A number was written as null without a word; read_manifest refuses it the same way."""
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"image": "a", "labels": ["cardiomegaly"], "indication": 5}) + "\n")
    with pytest.raises(RadtrtError, match=r"labels.jsonl:1: 'indication' must be a string or null"):
        synthesize(path, tmp_path / "out.jsonl", client=None, console=None)
    assert not (tmp_path / "out.jsonl").exists()


def test_parse_labels_and_template_errors() -> None:
    assert parse_labels({"Cardiomegaly": 1, "Edema": -1, "Fracture": None}, "x").uncertain == ("Edema",)
    with pytest.raises(RadtrtError, match="must be 1, 0, -1"):
        parse_labels({"Cardiomegaly": 2}, "x")
    with pytest.raises(RadtrtError, match="list of names"):
        parse_labels("cardiomegaly", "x")
    with pytest.raises(RadtrtError, match="must be 1, 0, -1"):  # was a TypeError (unhashable list)
        parse_labels({"Edema": [1]}, "x")
    with pytest.raises(RadtrtError, match="'cardiomegaly' is given more than once"):  # contradictory text
        parse_labels({"Cardiomegaly": 1, "cardiomegaly": 0}, "x")
    with pytest.raises(RadtrtError, match="'No Finding' is positive together"):
        parse_labels({"No Finding": 1, "Edema": 1}, "x")
    with pytest.raises(RadtrtError, match="not 'situs inversus'"):
        template_text(parse_labels({"situs inversus": 1}, "x"), __import__("random").Random(0))


def test_template_rows_of_phantom_labels_with_negatives_and_a_negated_no_finding() -> None:
    """A phantom label marked 0 sent the row to CheXpert's phrases, which refused 'pneumothorax_left' as unknown
    ("knows the phantom labels ... not 'pneumothorax_left'"); {"No Finding": 0} alone was written as "No acute
    cardiopulmonary abnormality.", the opposite of its label."""
    import random

    from radtrt.data.labeler import extract_labels

    text = template_text(parse_labels({"cardiomegaly": 1, "pneumothorax_left": 0}, "x"), random.Random(0), "l:1")
    assert extract_labels(text) == ["cardiomegaly"]
    with pytest.raises(RadtrtError, match="^l:2: 'No Finding' is negated, yet no finding is positive or uncertain"):
        template_text(parse_labels({"No Finding": 0}, "x"), random.Random(0), "l:2")
    with pytest.raises(RadtrtError, match="^l:3: template mode writes phantom labels \\('pneumothorax_left'\\) as "
                                          "present or absent only"):
        template_text(parse_labels({"pneumothorax_left": -1}, "x"), random.Random(0), "l:3")


def test_cli_synthesize(server: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    runner = CliRunner()
    labels = _labels_file(tmp_path / "labels.jsonl", n=2)
    monkeypatch.setenv("MY_KEY", KEY)
    result = runner.invoke(app, ["data", "synthesize", "--labels", str(labels), "-o", str(tmp_path / "o.jsonl"),
                                 "--endpoint", server.url, "--model", "m", "--api-key-env", "MY_KEY",
                                 "--rate", "100"])
    assert result.exit_code == 0, result.stderr
    assert KEY not in result.stdout + result.stderr and "2 request(s)" in result.stderr
    assert server.requests[0]["auth"] == f"Bearer {KEY}" and (tmp_path / "o.jsonl.cache").is_dir()
    bad = runner.invoke(app, ["data", "synthesize", "--labels", str(labels), "-o", str(tmp_path / "p.jsonl")])
    assert bad.exit_code == 2 and "--template" in bad.stderr and "Traceback" not in bad.stderr


def test_synthesize_refusals_leave_no_output(tmp_path: Path) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl")
    before = labels.read_text()
    with pytest.raises(RadtrtError, match="is the label file itself"):
        synthesize(labels, labels, client=None)  # exited 0 having "completed" the labels as a manifest
    assert labels.read_text() == before
    with pytest.raises(RadtrtError, match="is a folder"):
        synthesize(labels, tmp_path, client=None)
    (tmp_path / "x.jsonl.partial").mkdir()  # "give the file to write": the user gave -o x.jsonl
    with pytest.raises(RadtrtError) as refused:
        synthesize(labels, tmp_path / "x.jsonl", client=None)
    assert str(refused.value) == (f"{tmp_path / 'x.jsonl.partial'}, where the rows of -o {tmp_path / 'x.jsonl'} "
                                  f"wait until the last is written, is a folder: move it away")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"image": "a.png", "labels": ["situs inversus"]}) + "\n")
    with pytest.raises(RadtrtError, match="not 'situs inversus'"):
        synthesize(unknown, tmp_path / "out.jsonl", client=None)
    assert not (tmp_path / "out.jsonl").exists()  # an empty manifest was left behind
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x89PNG")
    with pytest.raises(RadtrtError, match="binary.jsonl:1: not UTF-8 text"):
        synthesize(binary, tmp_path / "out2.jsonl", client=None)


@pytest.mark.parametrize("endpoint,options,match", [
    ("http://[::1", {}, "not a valid URL"),
    ("http:///v1", {}, "names no host"),
    # the port was parsed only when urllib sent the request: InvalidURL, retried with backoff, then "rerun"
    ("http://127.0.0.1:notaport/v1", {}, "is not a valid URL"),
    ("http://127.0.0.1:99999/v1", {}, "is not a valid URL"),
    ("http://exa mple/v1", {}, "contains a space"),  # every request failed, then "rerun to resume"
    ("http://exa%20mple/v1", {}, "invalid host name"),
    # taken for a host name by urllib: a DNS failure retried six times, then "gaierror"; the password not repeated
    ("http://user:s3cret@127.0.0.1:9/v1", {}, r"^--endpoint holds a user name or password \('user:password@' before "
                                              r"the host\), which radtrt does not send: give the URL without them"),
    ("http://127.0.0.1:9?api-version=1@x", {"timeout_s": -1.0}, "--timeout must be positive"),  # '@' not in the host
    ("http://user:s3cret@[::1/v1", {}, r"^--endpoint holds a user name or password"),  # not repeated as invalid
    ("http://127.0.0.1:9/v1", {"timeout_s": -1.0}, "--timeout must be positive"),
    ("http://127.0.0.1:9/v1", {"timeout_s": float("nan")}, "--timeout must be positive"),
    # past threading.TIMEOUT_MAX: an OverflowError traceback in the socket timeout or the rate limiter's sleep
    ("http://127.0.0.1:9/v1", {"timeout_s": 1e12}, "--timeout must be positive seconds, a finite number at most "
                                                    "3600, got 1e\\+12"),
    ("http://127.0.0.1:9/v1", {"rate_per_s": float("inf")}, r"--rate must be a finite number of requests per second, "
                                                            r"at least .*, got inf$"),  # as if inf were too small
    ("http://127.0.0.1:9/v1", {"rate_per_s": 1e-300}, r"--rate must be .* at least 0.000166667 \(a request every "
                                                       r"6000 s\), got 1e-300"),
    ("http://127.0.0.1:9/v1", {"rate_per_s": 0.0}, "--rate must be"),
    ("http://127.0.0.1:9/v1", {"max_retries": -1}, "--retries must be at least 0"),
])
def test_unusable_endpoint_settings_are_refused_before_any_request(endpoint: str, options: dict, match: str) -> None:
    with pytest.raises(RadtrtError, match=match):
        ChatClient(endpoint, "m", **options)


def test_invalid_url_is_never_retried() -> None:
    """http.client's InvalidURL is an HTTPException, so it was retried with backoff like a cut-off body."""
    sleeps: list[float] = []
    client = ChatClient("http://127.0.0.1:9/v1", "m", rate_per_s=1e9, sleep=sleeps.append)
    client.url = "http://127.0.0.1:9/v 1"  # past the up-front check, as a URL urllib cannot send
    with pytest.raises(RadtrtError, match="is not a valid URL"):
        client.complete([{"role": "user", "content": "x"}])
    assert client.requests_made == 1 and not sleeps


def test_a_refused_connection_is_said_in_words() -> None:
    """"(last: URLError)" / "(last: gaierror)" named an exception class, not what went wrong."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", rate_per_s=1e9, max_retries=0)
    with pytest.raises(RadtrtError, match=r"failed once \(last: connection refused \(nothing listens at --endpoint\?\)\)"):
        client.complete([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("content, match", [
    (5, "content that is not text"),  # was "answered with empty content"
    ([{"type": "text", "text": "x"}], "content that is not text"),
    (None, "empty content"),
    ("  ", "empty content"),
])
def test_answer_content_that_is_no_text_is_named(content: object, match: str) -> None:
    with pytest.raises(RadtrtError, match=match):
        ChatClient._parse({"choices": [{"message": {"content": content}}]})


def test_unusable_cache_folder_is_refused_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RadtrtError, match="answer cache folder .* is not a folder"):
        ChatClient("http://127.0.0.1:9/v1", "m", cache_dir=tmp_path / "file" / "cache")


def test_damaged_cache_entry_is_one_line(server: ScriptedServer, tmp_path: Path) -> None:
    client = _client(server, tmp_path / "cache", [])
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Positive findings: edema."}]
    assert client.complete(messages).strip() == "Findings for edema."
    entry = next((tmp_path / "cache").rglob("*.json"))
    entry.write_text('{"content": 3}')
    with pytest.raises(RadtrtError, match="answer cache entry .* is damaged"):
        client.complete(messages)
    assert len(server.requests) == 1


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    """A rerun with another seed left the file as it was (exit 0); a template manifest finished by an endpoint
    mixed both kinds of rows."""
    labels = _labels_file(tmp_path / "labels.jsonl")
    out = synthesize(labels, tmp_path / "out.jsonl", client=None, seed=0, console=None)
    with pytest.raises(RadtrtError, match="rows made with other settings"):
        synthesize(labels, out, client=None, seed=7, console=None)
    assert synthesize(labels, out, client=None, seed=0, console=None) == out  # same settings: nothing to do
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for version, said in ((None, r"\(rows whose findings were all uncertain were labelled no_finding; rows whose only positive "
                                 "or uncertain findings were support"),
                          (2, r"\(rows whose only positive or uncertain findings were support devices")):
        for row in rows:  # as written before the label rules changed (uncertain-only rows got no_finding)
            row["synthesis"].pop("label_rules", None)
            if version is not None:
                row["synthesis"]["label_rules"] = version
        for rewrite in (rows[:-1], rows):  # unfinished, and finished ('nothing to do' before)
            out.write_text("".join(json.dumps(row) + "\n" for row in rewrite))
            with pytest.raises(RadtrtError, match=f"made with an older radtrt's label rules {said}.*; delete it to "
                                                  f"make it again"):
                synthesize(labels, out, client=None, seed=0, console=None)


@pytest.mark.parametrize("change", [
    {"labels": {"Pneumothorax": 0, "Edema": 1}},  # same image, other labels: the old findings were kept, rc 0
    {"indication": "Fever."},
])
def test_resume_after_the_label_file_changed_is_refused(tmp_path: Path, change: dict) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl")
    out = synthesize(labels, tmp_path / "out.jsonl", client=None, console=None)
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    rows[2].update(change)
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = out.read_text().splitlines(keepends=True)
    out.write_text("".join(kept[:3]))  # a stopped run: rows 0-2 finished
    with pytest.raises(RadtrtError, match=r"other labels or indications .*row 3, image img2.png"):
        synthesize(labels, out, client=None, console=None)
    assert out.read_text() == "".join(kept[:3])


def test_resume_with_unchanged_labels_completes(tmp_path: Path) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl")
    out = synthesize(labels, tmp_path / "out.jsonl", client=None, console=None)
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))
    assert synthesize(labels, out, client=None, console=None).read_text() == whole


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_unusable_temperature_is_refused(tmp_path: Path, temperature: float) -> None:
    with pytest.raises(RadtrtError, match="--temperature must be within 0-2"):
        synthesize(_labels_file(tmp_path / "labels.jsonl"), tmp_path / "out.jsonl", client=None,
                   temperature=temperature, console=None)
    assert not (tmp_path / "out.jsonl").exists()


def test_errors_name_the_files_own_line(tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n\n" + json.dumps({"image": "", "labels": []}) + "\n")
    with pytest.raises(RadtrtError, match=r"labels.jsonl:3: 'image' is missing, empty"):
        synthesize(labels, tmp_path / "out.jsonl", client=None, console=None)


def test_retry_after_is_capped(server: ScriptedServer, tmp_path: Path) -> None:
    from radtrt.data.chat import MAX_WAIT_S

    server.script = [(429, {"Retry-After": "100000"}), (429, {"Retry-After": "inf"})]
    sleeps: list[float] = []
    synthesize(_labels_file(tmp_path / "labels.jsonl", n=1), tmp_path / "out.jsonl",
               client=_client(server, None, sleeps), console=None)
    assert sleeps == [MAX_WAIT_S, 1.0]  # a day's wait capped; "inf" is no number: backoff 0.5 * 2**1


def test_the_synthesizer_retries_as_the_judge_does(server: ScriptedServer, tmp_path: Path) -> None:
    """The two chat clients kept their own rules: a 520 was fatal here and retried by the judge, and only the
    judge obeyed retry-after-ms. A 501 (no such endpoint) is fatal to both."""
    server.script = [(520, {}), (503, {"retry-after-ms": "250"})]
    sleeps: list[float] = []
    synthesize(_labels_file(tmp_path / "labels.jsonl", n=1), tmp_path / "out.jsonl",
               client=_client(server, None, sleeps), console=None)
    assert sleeps == [0.5, 0.25] and len(server.requests) == 3
    server.script = [(501, {})]
    with pytest.raises(RadtrtError, match="HTTP 501"):
        synthesize(_labels_file(tmp_path / "labels2.jsonl", n=1), tmp_path / "out2.jsonl",
                   client=_client(server, None, sleeps), console=None)


def test_an_endpoint_failing_at_once_leaves_no_empty_manifest(server: ScriptedServer, tmp_path: Path) -> None:
    server.script = [(400, {})]
    with pytest.raises(RadtrtError, match="HTTP 400"):
        synthesize(_labels_file(tmp_path / "labels.jsonl"), tmp_path / "out.jsonl",
                   client=_client(server, None, []), console=None)
    assert not (tmp_path / "out.jsonl").exists()


def _cli(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    result = CliRunner().invoke(app, ["data", "synthesize", *args])
    assert "Traceback" not in result.stderr
    return result.exit_code, result.stderr


def test_endpoint_options_with_template_are_refused(tmp_path: Path) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl")
    code, err = _cli("--labels", str(labels), "-o", str(tmp_path / "o.jsonl"), "--template", "--temperature", "1.5",
                     "--rate", "5", "--cache", str(tmp_path / "c"))
    assert code == 2 and "drop --rate/--cache/--temperature" in err  # each was accepted and unused
    assert not (tmp_path / "o.jsonl").exists()


def test_cache_that_is_the_output_or_the_labels_is_refused(server: ScriptedServer, tmp_path: Path) -> None:
    labels = _labels_file(tmp_path / "labels.jsonl")
    out = tmp_path / "out.jsonl"
    for cache, name in ((out, "output manifest"), (labels, "label file")):
        code, err = _cli("--labels", str(labels), "-o", str(out), "--cache", str(cache), "--endpoint", server.url,
                         "--model", "m")
        assert code == 2 and f"is the {name}" in err, err  # was NotADirectoryError after a paid request
    assert not server.requests and not out.exists()


def test_relative_images_are_written_relative_to_the_new_manifest(tmp_path: Path) -> None:
    """'png/a.png' was copied as written: relative to the label file's folder, it named nothing beside -o."""
    source = tmp_path / "set"
    (source / "png").mkdir(parents=True)
    (source / "png" / "a.png").write_bytes(b"x")
    labels = source / "labels.jsonl"
    labels.write_text(json.dumps({"image": "png/a.png", "labels": ["cardiomegaly"]}) + "\n"
                      + json.dumps({"image": "/abs/b.png", "labels": ["cardiomegaly"]}) + "\n")
    out = synthesize(labels, tmp_path / "elsewhere" / "out.jsonl", client=None, console=None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["image"] == "../set/png/a.png" and rows[1]["image"] == "/abs/b.png"
    assert (out.parent / rows[0]["image"]).resolve() == (source / "png" / "a.png").resolve()
    beside = synthesize(labels, source / "out.jsonl", client=None, console=None)  # same folder: unchanged
    assert json.loads(beside.read_text().splitlines()[0])["image"] == "png/a.png"
    assert synthesize(labels, out, client=None, console=None) == out  # a rerun finds its rows done
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    old = tmp_path / "elsewhere" / "old.jsonl"  # rows the radtrt before the rebasing wrote: paths as given
    old.write_text(json.dumps({**rows[0], "image": "png/a.png"}) + "\n")
    with pytest.raises(RadtrtError, match=r"old.jsonl was made by an older radtrt, which copied image paths as "
                                          r"written \(png/a.png names nothing beside it\); delete it"):
        synthesize(labels, old, client=None, console=None)
    beside_old = source / "old.jsonl"  # beside the label file, spelt './png/a.png': the same image, resumed
    beside_old.write_text(json.dumps({**rows[0], "image": "./png/a.png"}) + "\n")
    assert len(synthesize(labels, beside_old, client=None, console=None).read_text().splitlines()) == 2
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    with pytest.raises(RadtrtError, match="loop-a is a symbolic link loop"):  # a RuntimeError traceback
        synthesize(labels, tmp_path / "loop-a" / "m.jsonl", client=None, console=None)


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"choices": ' + b"1" * 5000 + b"}", b"<html>"])
def test_an_answer_that_is_not_json_is_one_error(server: ScriptedServer, body: bytes) -> None:
    """A number of 4300+ digits (ValueError) or nesting too deep (RecursionError) escaped as a traceback."""
    server.script = [(200, {"Content-Length": str(len(body))}, body)]
    with pytest.raises(RadtrtError, match="chat endpoint answered with something that is not JSON"):
        _client(server, None, []).complete([{"role": "user", "content": "x"}])


def test_a_redirect_is_refused_not_followed(server: ScriptedServer, tmp_path: Path) -> None:
    """urllib followed it: the Authorization header went to the other host, the POST became a GET, and what
    that answered was written as findings (exit 0)."""
    server.script = [(302, {"Location": server.url.replace("/v1", "/elsewhere?api-key=SECRET")}, b"")]
    labels = _labels_file(tmp_path / "labels.jsonl", n=1)
    code, err = _cli("--labels", str(labels), "-o", str(tmp_path / "o.jsonl"), "--endpoint", server.url,
                     "--model", "m")
    host = server.url.split("/")[2]
    assert code == 2 and f"chat endpoint redirected (HTTP 302) to http://{host}; give the final URL as --endpoint" \
        in err, err
    assert "SECRET" not in err and "elsewhere" not in err and len(server.requests) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_a_refusal_shows_the_servers_message(server: ScriptedServer, tmp_path: Path) -> None:
    """A 4xx said only "HTTP 400"; the judge's client shows the server's reason, one line, cut short, key blanked."""
    reason = f"max_tokens is not supported.\nYour key {KEY} \x1b[31mwas fine. " + "padding " * 60
    server.script = [(400, {}, json.dumps({"error": {"message": reason, "param": "Positive findings: x"}}).encode()),
                     (404, {}, b"no such model"), (422, {}, json.dumps({"detail": [{"input": "report"}]}).encode()),
                     (400, {}, b"<html><body>Bad request: Positive findings: small left effusion</body></html>")]
    client = _client(server, None, [])
    with pytest.raises(RadtrtError) as info:
        client.complete([{"role": "user", "content": "x"}])
    line = str(info.value)
    assert line.startswith("chat endpoint refused the request: HTTP 400: max_tokens is not supported. Your key [key] "
                           "\\x1b[31mwas fine.") and line.endswith("...") and len(line) < 300, line
    assert KEY not in line and "\n" not in line and "\x1b" not in line and "Positive findings" not in line
    # a non-JSON body is not shown: there is no message to tell from the rest, which may echo the report
    with pytest.raises(RadtrtError, match=r"refused the request: HTTP 404$"):
        client.complete([{"role": "user", "content": "x"}])
    with pytest.raises(RadtrtError, match=r"HTTP 422$"):  # a validation error's fields may echo the report
        client.complete([{"role": "user", "content": "x"}])
    with pytest.raises(RadtrtError, match=r"refused the request: HTTP 400$"):  # an HTML page neither
        client.complete([{"role": "user", "content": "x"}])
    # a message that repeats the request (a proxy's "invalid input: ..."): the indication it holds was shown
    prompt = "Write the findings. Indication: Patient DOE^JOHN, MRN 1234, cough. Positive findings: pneumothorax."
    server.script = [(400, {}, json.dumps({"error": {"message": f"invalid input: {prompt[12:80]}"}}).encode())]
    with pytest.raises(RadtrtError, match=r"refused the request: HTTP 400: its message quotes the request, which "
                                          r"holds clinical text: not shown$") as info:
        client.complete([{"role": "user", "content": prompt}])
    assert "DOE" not in str(info.value) and "1234" not in str(info.value)


@pytest.mark.parametrize("row, name", [
    ('{"image": "a.png", "labels": ["cardiomegaly"], "indication": "Cough \\ud800"}', "'indication'"),
    ('{"image": "b\\ud800.png", "labels": ["cardiomegaly"]}', "'image'"),
    ('{"image": "a.png", "labels": {"Edema\\udfff": 1}}', "'labels'"),
    ('{"image": "a.png", "labels": [], "site": ["x", {"\\ud800": 1}]}', "'site'"),
    ('{"image": "a.png", "labels": [], "\\ud800": 1}', "a key"),
])
def test_a_lone_surrogate_is_refused_before_any_request(server: ScriptedServer, tmp_path: Path, row: str,
                                                        name: str) -> None:
    """Writing the row failed with a UnicodeEncodeError traceback mid-run, after the endpoint was paid; template
    mode left an empty manifest behind."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "ok.png", "labels": ["edema"]}) + "\n" + row + "\n")
    for mode in (["--template"], ["--endpoint", server.url, "--model", "m"]):
        code, err = _cli("--labels", str(labels), "-o", str(tmp_path / "o.jsonl"), *mode)
        assert code == 2 and f"labels.jsonl:2: {name} holds a lone surrogate escape" in err, err
        assert not (tmp_path / "o.jsonl").exists()
    assert not server.requests


@pytest.mark.parametrize("key, said", [
    (KEY + "\r", "a line break"),  # a key file saved with Windows line ends: "answered with something not JSON"
    (KEY + "\n", "a line break"),
    ("sk-test-\u00fc-0123456789", "a character that is not ASCII"),
    ("sk-test-\x07-0123456789", "a control character"),
])
def test_an_api_key_that_cannot_be_sent_is_refused_up_front(server: ScriptedServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, key: str,
                                                             said: str) -> None:
    monkeypatch.setenv("MY_KEY", key)
    code, err = _cli("--labels", str(_labels_file(tmp_path / "labels.jsonl", n=1)), "-o", str(tmp_path / "o.jsonl"),
                     "--endpoint", server.url, "--model", "m", "--api-key-env", "MY_KEY")
    assert code == 2 and f"the API key in MY_KEY holds {said}" in err and "set MY_KEY to the key alone" in err, err
    assert key.strip() not in err and "0123456789" not in err
    assert not server.requests and not (tmp_path / "o.jsonl").exists()


def test_a_key_variable_that_is_not_set_is_said_so(server: ScriptedServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With --api-key-env naming an unset variable (a typo, a missing export) the requests went out with no key,
    and the endpoint's 401 was 'check the API key': a key that was never read."""
    labels = str(_labels_file(tmp_path / "labels.jsonl", n=1))
    monkeypatch.delenv("MY_KEY_TYPO", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, err = _cli("--labels", labels, "-o", str(tmp_path / "o.jsonl"), "--endpoint", server.url, "--model", "m",
                     "--api-key-env", "MY_KEY_TYPO")
    assert code == 2 and "--api-key-env MY_KEY_TYPO: that environment variable is not set" in err, err
    assert not server.requests and not (tmp_path / "o.jsonl").exists()
    server.script = [(401, {})]  # the default variable unset: a keyless server is allowed, a 401 says why
    code, err = _cli("--labels", labels, "-o", str(tmp_path / "o.jsonl"), "--endpoint", server.url, "--model", "m")
    assert code == 2 and "HTTP 401" in err and "no API key was sent: OPENAI_API_KEY is not set" in " ".join(err.split())
    assert server.requests[0]["auth"] is None
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.script = [(401, {})]
    code, err = _cli("--labels", labels, "-o", str(tmp_path / "o.jsonl"), "--endpoint", server.url, "--model", "m")
    assert code == 2 and "(check the API key)" in err and KEY not in err


def test_timeout_help_says_what_it_bounds() -> None:
    """It said "Seconds per request", but urllib applies it to connecting and to each read of the answer."""
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    result = CliRunner().invoke(app, ["data", "synthesize", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "Seconds the endpoint may stay silent (to connect, or between bytes of its answer)" in text, text
    assert "Seconds per request" not in text


def test_a_repeat_among_many_labels_is_found() -> None:
    """Repeated names were found with list.count for each name (30,000 labels took 17 s; now counted once, no
    timing asserted here: speed lives in benchmark commands)."""
    names = [f"finding {i}" for i in range(20_000)]
    assert len(parse_labels(names, "x").positive) == 20_000
    with pytest.raises(RadtrtError, match="'finding 7' is given more than once"):
        parse_labels([*names, "Finding_7"], "x")


def test_a_manifest_is_left_where_it_was_by_every_refusal(tmp_path: Path) -> None:
    """A template refusal came after the manifest was moved to OUT.partial; a symbolic link -o was moved and the
    file it named written in place; a shorter label file was called one of 'other images'."""
    labels = _labels_file(tmp_path / "labels.jsonl", n=3)
    out = synthesize(labels, tmp_path / "out.jsonl", client=None, console=None)
    whole = out.read_bytes()
    grown = tmp_path / "grown.jsonl"
    grown.write_text(labels.read_text() + json.dumps({"image": "img9.png", "labels": ["foo_unknown"]}) + "\n")
    with pytest.raises(RadtrtError, match="not 'foo_unknown'"):
        synthesize(grown, out, client=None, console=None)
    shorter = _labels_file(tmp_path / "shorter.jsonl", n=2)
    with pytest.raises(RadtrtError, match=r"holds 3 rows, more than the label file's 2; delete .* to make it again"):
        synthesize(shorter, out, client=None, console=None)
    assert out.read_bytes() == whole and not (tmp_path / "out.jsonl.partial").exists()
    (tmp_path / "link.jsonl").symlink_to(out)
    (tmp_path / "someone.txt").write_text("")
    (tmp_path / "l2.jsonl.partial").symlink_to(tmp_path / "someone.txt")
    for name in ("link.jsonl", "l2.jsonl"):
        with pytest.raises(RadtrtError, match=r"is a symbolic link; give the path of the file itself"):
            synthesize(labels, tmp_path / name, client=None, console=None)
    assert out.read_bytes() == whole and (tmp_path / "someone.txt").read_text() == ""
    (tmp_path / "notes.txt").write_text("my notes")  # the lock beside -o emptied a link's target, and removed
    (tmp_path / "l3.jsonl.lock").symlink_to(tmp_path / "notes.txt")  # a file that only shared its name
    (tmp_path / "l4.jsonl.lock").write_text("user data")
    for name, said in (("l3.jsonl", "is a symbolic link, where radtrt keeps its lock file"),
                       ("l4.jsonl", "exists and is not a radtrt lock file; move it away")):
        with pytest.raises(RadtrtError, match=said):
            synthesize(labels, tmp_path / name, client=None, console=None)
    assert (tmp_path / "notes.txt").read_text() == "my notes" and (tmp_path / "l4.jsonl.lock").read_text() == "user data"


def test_a_second_run_on_the_same_manifest_is_refused_while_the_first_writes(tmp_path: Path) -> None:
    """Both appended to one OUT.partial, and the first to end renamed it: rows twice under the final name."""
    import subprocess
    import sys

    labels = _labels_file(tmp_path / "labels.jsonl", n=2)
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from radtrt.locks import lock_file; "
         "lock = lock_file(Path(sys.argv[1]), 'busy', 'no locks'); print('locked', flush=True); sys.stdin.read()",
         str(tmp_path / "out.jsonl.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RadtrtError, match=f"process {holder.pid} is writing {out} right now; wait for it to end"):
            synthesize(labels, out, client=None, console=None)
        assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()
    finally:
        holder.communicate("")
    assert synthesize(labels, out, client=None, console=None) == out and not (tmp_path / "out.jsonl.lock").exists()


def test_an_interrupted_run_says_where_its_rows_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """It ended with the generic 'no output was left half-written', silent on the rows kept in OUT.partial."""
    from radtrt import interrupts
    from radtrt.data import synthesize as module

    positive = module._positive_names
    calls: list[int] = []

    def third_interrupted(labels: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return positive(labels)

    monkeypatch.setattr(module, "_positive_names", third_interrupted)
    monkeypatch.setattr(interrupts, "_explained", False)
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        synthesize(_labels_file(tmp_path / "labels.jsonl"), out, client=None, console=None)
    err = " ".join(capsys.readouterr().err.split())
    partial = tmp_path / "out.jsonl.partial"
    assert f"radtrt: interrupted; 2 of 4 rows are kept in {partial}: run the same command again" in err, err
    assert len(partial.read_text().splitlines()) == 2 and not out.exists() and interrupts._explained
