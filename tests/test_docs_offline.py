"""The API docs work without internet access: /docs (Swagger UI) and /redoc (ReDoc) name no other host, every file
they load is answered by the app itself, and /metrics counts them (and any static files) by route template."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import PurePosixPath

import pytest
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse

from app.metrics import Metrics, MetricsMiddleware

PAGES = ("/docs", "/redoc")
# What each kind of file a page loads must be answered as.
MEDIA_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


class References(HTMLParser):
    """Every URL a page loads: src and href attributes, ReDoc's spec-url, and the spec `url:` of Swagger UI's script."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]

    def handle_data(self, data: str) -> None:
        self.urls += re.findall(r"""\burl:\s*['"]([^'"]+)['"]""", data)


def references(html: str) -> list[str]:
    parser = References()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_names_no_other_host(service, page):
    r = service.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", r.text, re.IGNORECASE), re.findall(r"https?://\S+", r.text)
    urls = references(r.text)
    assert any(u.endswith(".js") for u in urls) and "/openapi.json" in urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from outside the app"


@pytest.mark.parametrize("page", PAGES)
def test_every_file_a_docs_page_loads_is_served_by_the_app(service, page):
    for url in references(service.get(page).text):
        r = service.get(url)
        assert r.status_code == 200, (url, r.status_code)
        assert MEDIA_TYPES[PurePosixPath(url).suffix] in r.headers["content-type"], (url, r.headers["content-type"])
        assert len(r.content) > 100, url


def test_docs_follow_the_root_path(service_weights):
    """Behind a proxy that serves the app under a prefix, the pages name their files under that prefix."""
    from app.main import create_app
    from app.settings import Settings

    client = TestClient(create_app(Settings(weights=service_weights)), root_path="/api")
    for page in PAGES:
        urls = references(client.get(page).text)
        assert urls and all(u.startswith("/api/") for u in urls), urls


def test_metrics_label_docs_and_their_files_by_route(service):
    pages = {page: service.get(page) for page in PAGES}
    for page in PAGES:
        for url in references(pages[page].text):
            service.get(url)
    service.get("/docs/oauth2-redirect")
    service.get("/")  # the landing page where there is one; a 404 otherwise
    service.get("/docs/assets/no-such-file.js")
    text = service.get("/metrics").text
    for route in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json", "/docs/assets/{path}"):
        assert f'did_requests_total{{method="GET",route="{route}",status="200"}}' in text, route
    assert 'route="/docs/assets/{path}",status="404"' in text  # a missing file: the mount answered, by its template
    answered = re.findall(r'did_requests_total\{method="GET",route="unmatched",status="([0-9]+)"\}', text)
    assert all(status == "404" for status in answered), f"answered requests labelled unmatched: {answered}"


def test_metrics_label_mounts_and_plain_routes_by_template(tmp_path):
    """Whatever serves a path (a FastAPI route, a plain Starlette route, static files mounted at a prefix or at the
    root), its requests are counted under its template; only a request no route answers is `unmatched`."""
    (tmp_path / "index.html").write_text("<!doctype html><title>demo</title>")
    (tmp_path / "a.png").write_bytes(b"png")
    metrics = Metrics()
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    app.add_route("/plain", lambda request: PlainTextResponse("plain"))
    app.mount("/examples", StaticFiles(directory=tmp_path), name="examples")
    app.mount("/", StaticFiles(directory=tmp_path, html=True), name="site")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    client = TestClient(app)
    for path in ("/items/3", "/items/4", "/plain", "/examples/a.png", "/", "/a.png", "/nope"):
        client.get(path)

    def count(route: str, status: int) -> float | None:
        labels = {"method": "GET", "route": route, "status": str(status)}
        return metrics.registry.get_sample_value("did_requests_total", labels)

    assert count("/items/{item_id}", 200) == 2
    assert count("/plain", 200) == 1
    assert count("/examples/{path}", 200) == 1
    assert count("/{path}", 200) == 2  # "/" (index.html) and "/a.png", both through the mount at the root
    assert count("/{path}", 404) == 1  # the root mount answers every other path, so nothing is unmatched here
    assert count("unmatched", 404) is None


def test_docs_need_no_api_key(make_service):
    client = make_service(api_keys=["k1"])
    for page in PAGES:
        assert client.get(page).status_code == 200
        for url in references(client.get(page).text):
            assert client.get(url).status_code == 200, url
    assert client.get("/models").status_code == 401
