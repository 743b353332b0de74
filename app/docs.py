"""The interactive API docs, served whole by the app: /docs (Swagger UI) and /redoc (ReDoc) load their scripts,
styles and icon from /docs/assets, never from a CDN, so they work on a host without internet access.

The files come from the `fastapi-offline` package (serve extra): Swagger UI's swagger-ui-bundle.js and
swagger-ui.css, ReDoc's redoc.standalone.js and a favicon. Only its static folder is used; the pages are FastAPI's
own (`get_swagger_ui_html`, `get_redoc_html`) pointed at those files.
"""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
ASSETS_DIR = files("fastapi_offline").joinpath("static")


def install(app: FastAPI) -> None:
    """Add /docs, /docs/oauth2-redirect, /redoc and the mount /docs/assets to an app created with docs_url=None and
    redoc_url=None (FastAPI's own pages would load the CDN's files)."""
    assert app.docs_url is None and app.redoc_url is None and app.openapi_url

    def root(request: Request) -> str:
        """The root path the app is served under (behind a proxy), which every URL of a page starts with."""
        return request.scope.get("root_path", "").rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        assets = root(request) + ASSETS_URL
        return get_swagger_ui_html(
            openapi_url=root(request) + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            oauth2_redirect_url=root(request) + OAUTH2_REDIRECT_URL,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        assets = root(request) + ASSETS_URL
        return get_redoc_html(
            openapi_url=root(request) + app.openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )

    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")
