"""``radtrt data phantoms|synthesize``: thin typer commands over ``radtrt.data``.

``register(app)`` adds the ``data`` group to the main app; ``guarded`` (the shared
``cli_support.user_errors``) gives these commands the CLI's error contract.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from radtrt.cli_support import err, user_errors
from radtrt.errors import fail

guarded = user_errors


def phantoms(
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (new or empty)."),
    n: int = typer.Option(100, "--n", min=1, help="Number of phantoms."),
    seed: int = typer.Option(0, "--seed", min=0, help="Phantom i depends only on (seed, i)."),
    rows: int = typer.Option(288, "--rows", help="Image height in pixels."),
    cols: int = typer.Option(256, "--cols", help="Image width in pixels."),
    formats: str = typer.Option("dicom,png", "--formats", help="Comma-separated: dicom, png."),
) -> None:
    """Synthetic chest-radiograph phantoms with known findings (pipeline tests and demos; NOT clinical)."""
    from radtrt.data.phantom_set import write_phantom_set

    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    manifest = write_phantom_set(out, n, seed, rows=rows, cols=cols, formats=chosen, console=err)
    err.print(f"{n} synthetic phantoms (not for clinical use) in {out}", highlight=False)
    typer.echo(str(manifest))


def synthesize(
    labels: Path = typer.Option(..., "--labels", help="JSONL rows {image, labels, indication?}."),
    out: Path = typer.Option(..., "-o", "--out", help="Output manifest (JSONL); an unfinished one is completed."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. https://host/v1."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name the endpoint serves."),
    template: bool = typer.Option(False, "--template", help="Offline deterministic templates instead of an endpoint."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the key."),
    rate: float = typer.Option(1.0, "--rate", help="At most this many requests per second."),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per request on 429/5xx/timeouts."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds per request."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Answer cache folder (default: OUT.cache)."),
    temperature: float = typer.Option(0.0, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Turn structured label rows into findings text (chat endpoint, or --template offline)."""
    from radtrt.data.chat import ChatClient
    from radtrt.data.synthesize import synthesize as run

    client = None
    if template:
        if endpoint or model:
            fail("--template makes text offline; drop --endpoint/--model (or drop --template)")
    else:
        if not endpoint or not model:
            fail("pass --endpoint URL and --model NAME, or --template for offline template text")
        client = ChatClient(endpoint, model, api_key=os.environ.get(api_key_env) or None, rate_per_s=rate,
                            max_retries=retries, timeout_s=timeout,
                            cache_dir=cache or out.with_name(out.name + ".cache"))
    path = run(labels, out, client=client, seed=seed, temperature=temperature, console=err)
    if client is not None:
        err.print(f"{client.requests_made} request(s) sent to {client.url.split('/')[2]}", highlight=False)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``radtrt data phantoms|synthesize``."""
    data_app = typer.Typer(no_args_is_help=True, help="Training data: synthetic phantoms, report synthesis.")
    data_app.command("phantoms")(guarded(phantoms))
    data_app.command("synthesize")(guarded(synthesize))
    app.add_typer(data_app, name="data")
