"""The demo page: `/` (app/static/index.html), its script and style under `/static/`, and the sample images of the
examples directory (`DID_EXAMPLES`) under `/examples/`.

The page is plain HTML, CSS and JavaScript that calls the public API like any other client; nothing here computes.
All three are open without an API key: the page asks for the key and sends it with each API call itself.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/static"
EXAMPLES_URL = "/examples"
STATIC_DIR = Path(str(files("app").joinpath("static")))


def install(app: FastAPI, examples: Path) -> None:
    """Add `/`, the mount `/static` and, when the folder `examples` exists, the mount `/examples`; without it the page
    finds no samples (a 404 on /examples/index.json) and offers uploads only."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    if examples.is_dir():
        app.mount(EXAMPLES_URL, StaticFiles(directory=examples), name="examples")
