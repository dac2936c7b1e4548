"""``radtrt data phantoms|synthesize``: thin typer commands over ``radtrt.data``.

``register(app)`` adds the ``data`` group to the main app; ``guarded`` (the shared
``cli_support.user_errors``) gives these commands the CLI's error contract.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from radtrt.cli_support import PathOption, emit, err, user_errors
from radtrt.errors import fail
from radtrt.http_retry import check_api_key
from radtrt.outputs import resolved
from radtrt.progress import plain

guarded = user_errors


def phantoms(
    out: Path = PathOption(..., "-o", "--out", help="Output folder (new or empty)."),
    n: int = typer.Option(100, "--n", min=1, help="Number of phantoms."),
    seed: int = typer.Option(0, "--seed", min=0, help="Phantom i depends only on (seed, i)."),
    rows: int = typer.Option(288, "--rows", help="Image height in pixels."),
    cols: int = typer.Option(256, "--cols", help="Image width in pixels."),
    formats: str = typer.Option("dicom,png", "--formats", help="Comma-separated: dicom, png."),
) -> None:
    """Synthetic chest-radiograph phantoms with known findings (pipeline tests and demos; NOT clinical)."""
    from radtrt.data.phantom_set import write_phantom_set

    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    if not chosen:  # said as "unknown phantom format(s) ()"
        fail(f"--formats {formats!r} names no format; give dicom, png or both, comma-separated")
    manifest = write_phantom_set(out, n, seed, rows=rows, cols=cols, formats=chosen, console=err)
    err.print(plain(f"{n} synthetic phantoms (not for clinical use) in {out}"), highlight=False)
    emit(str(manifest))


def synthesize(
    labels: Path = PathOption(..., "--labels", help="JSONL rows {image, labels, indication?}."),
    out: Path = PathOption(..., "-o", "--out", file="manifest.jsonl", help="Output manifest (JSONL), written as OUT.partial until whole; a rerun completes an unfinished one."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. https://host/v1."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name the endpoint serves."),
    template: bool = typer.Option(False, "--template", help="Offline deterministic templates instead of an endpoint."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the key. "
                                                                          "\\[default: OPENAI_API_KEY]"),
    rate: Optional[float] = typer.Option(None, "--rate", help="At most this many requests per second. \\[default: 1]"),
    retries: Optional[int] = typer.Option(None, "--retries", min=0,
                                          help="Retries per request on 429/5xx/timeouts. \\[default: 5]"),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Seconds the endpoint may stay silent (to connect, or between bytes of its answer) "
                                "before an attempt times out; an answer that keeps arriving slowly is not cut off "
                                "(at most 3600). \\[default: 60]"),
    cache: Optional[Path] = PathOption(None, "--cache", help="Answer cache folder. \\[default: OUT.cache]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature of the endpoint. "
                                                                            "\\[default: 0]"),
    seed: int = typer.Option(0, "--seed", help="Template wording of row i; passed to the endpoint too."),
) -> None:
    """Turn structured label rows into findings text (chat endpoint, or --template offline)."""
    from radtrt.data.chat import ChatClient
    from radtrt.data.synthesize import synthesize as run

    client = None
    endpoint_only = {"--endpoint": endpoint, "--model": model, "--api-key-env": api_key_env, "--rate": rate,
                     "--retries": retries, "--timeout": timeout, "--cache": cache, "--temperature": temperature}
    if template:
        given = [flag for flag, value in endpoint_only.items() if value is not None]
        if given:  # each would be silently unused: templates are made offline
            fail(f"--template makes text offline; drop {'/'.join(given)} (or drop --template)")
    else:
        if not endpoint or not model:
            fail("pass --endpoint URL and --model NAME, or --template for offline template text")
        cache_dir = cache or out.with_name(out.name + ".cache")
        for name, path in (("output manifest", out), ("label file", labels)):
            if resolved(cache_dir) == resolved(path):
                fail(f"--cache {cache_dir} is the {name}; the answer cache needs a folder of its own")
        key_env = api_key_env or "OPENAI_API_KEY"
        api_key = os.environ.get(key_env) or None
        if api_key is not None:
            check_api_key(api_key, key_env)
        elif api_key_env is not None:  # named on purpose: a typo or a missing export, not a keyless server
            fail(f"--api-key-env {api_key_env}: that environment variable is not set (or empty); set it to the "
                 f"endpoint's API key, or drop --api-key-env for a server that needs none")
        limits = {"rate_per_s": rate, "max_retries": retries, "timeout_s": timeout}  # the client's defaults otherwise
        client = ChatClient(endpoint, model, api_key=api_key, key_env=key_env, cache_dir=cache_dir,
                            **{k: v for k, v in limits.items() if v is not None})
    path = run(labels, out, client=client, seed=seed, temperature=temperature or 0.0, console=err)
    if client is not None:
        err.print(f"{client.requests_made} request(s) sent to {client.url.split('/')[2]}", highlight=False)
    emit(str(path))


def register(app: typer.Typer) -> None:
    """Add ``radtrt data phantoms|synthesize``."""
    data_app = typer.Typer(no_args_is_help=True, help="Training data: synthetic phantoms, report synthesis.")
    data_app.command("phantoms")(guarded(phantoms))
    data_app.command("synthesize")(guarded(synthesize))
    app.add_typer(data_app, name="data")
