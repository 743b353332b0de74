"""The demo page at `/` in a real browser: Debian's Chromium (the `chromium` package), driven by Playwright on that
executable, against a real `did serve` process on the bundled weights.

The page must load without console errors, show a transfer's decoded answer, a mask model's segmentation over the
image, an interpolation's frames, and a problem body as a readable message. Screenshots go to runs/screenshots/
(git-ignored). Without Chromium or Playwright the browser tests are skipped; the HTTP checks of the page's files run
everywhere.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .conftest import draw_face, encode_image
from .test_service_process import clean_env, running_did_serve

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_WEIGHTS = ROOT / "weights"
SCREENSHOTS = ROOT / "runs" / "screenshots"
PAIRS = ("smile_glasses", "beard_smile", "beard_glasses")


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return None


def write_examples(root: Path) -> Path:
    """A samples folder of the layout the page reads: index.json naming the pairs, and per pair an index.json of
    {"samples": [{"file", "label"}]} beside the PNGs {label}-{i}.png."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.json").write_text(json.dumps({"pairs": list(PAIRS)}))
    seeds = {"glasses": (1, 4), "smile": (2, 5), "beard": (7, 8), "neither": (0, 3)}  # draw_face has no beards
    for pair in PAIRS:
        samples = []
        (root / pair).mkdir(exist_ok=True)
        for label in (*pair.split("_"), "neither"):
            for i, seed in enumerate(seeds[label]):
                name = f"{label}-{i}.png"
                (root / pair / name).write_bytes(encode_image(draw_face(seed, 96)))
                samples.append({"file": name, "label": label})
        (root / pair / "index.json").write_text(json.dumps({"pair": pair, "samples": samples}))
    return root


# --- the page's files over HTTP (no browser) --------------------------------------------------------------------

def test_page_and_samples_are_served(make_service, tmp_path):
    client = make_service(examples=write_examples(tmp_path / "examples"), api_keys="k1")
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")  # open without a key
    for path in ("static/app.js", "static/app.css"):
        assert path in r.text and client.get("/" + path).status_code == 200
    assert client.get("/examples/index.json").json() == {"pairs": list(PAIRS)}
    assert client.get("/examples/smile_glasses/smile-0.png").headers["content-type"] == "image/png"
    assert client.get("/models").status_code == 401  # the API itself still needs the key
    assert "/" not in client.get("/openapi.json", headers={"X-API-Key": "k1"}).json()["paths"]


def test_missing_examples_folder_means_no_samples(make_service, tmp_path):
    client = make_service(examples=tmp_path / "nowhere")
    assert client.get("/").status_code == 200
    r = client.get("/examples/index.json")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


# --- in the browser ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (Debian package chromium); the browser tests need it")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory) -> Iterator[str]:
    """Base URL of `did serve` on the bundled weights with a samples folder: the repository's examples/ when it has
    an index, else one written for this test."""
    examples = ROOT / "examples"
    if not (examples / "index.json").is_file():
        examples = write_examples(tmp_path_factory.mktemp("browser") / "examples")
    env = {**clean_env(), "DID_EXAMPLES": str(examples), "DID_TORCH_THREADS": "1"}
    with running_did_serve(BUNDLED_WEIGHTS, env) as base:
        yield base


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which CI and containers are
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    pg = context.new_page()
    errors: list[str] = []  # the page's console errors and uncaught exceptions
    pg.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    pg.console_errors = errors
    pg.goto(server + "/")
    pg.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield pg
    context.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def choose_model(page, name: str) -> None:
    page.select_option("#model", name)
    assert page.input_value("#pair") == name.removesuffix("_mask")  # the samples follow the model's pair


def fill_slots_from_pair(page) -> None:
    page.click("#use-pair")
    page.wait_for_function("() => [...document.querySelectorAll('.slot img')].every(i => !i.hidden && i.naturalWidth > 0)")


def wait_for_result(page) -> None:
    page.wait_for_function("() => /done$/.test(document.querySelector('#status').textContent) || "
                           "!document.querySelector('#error').hidden", timeout=30_000)
    assert page.is_hidden("#error"), page.inner_text("#error")


def test_page_loads_with_models_and_samples(page, server):
    models = httpx.get(server + "/models").json()
    assert page.input_value("#model") == models["default"]  # preselected: the one with "default": true
    assert page.locator("#model option").count() == len(models["models"])
    assert page.locator("#gallery .sample").count() > 0
    assert page.evaluate("() => [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)")
    screenshot(page, "page")
    assert not page.console_errors, page.console_errors


@pytest.mark.parametrize("action", ["transfer", "intersection", "remove"])
def test_an_edit_of_samples_shows_the_decoded_answer(page, action):
    choose_model(page, "smile_glasses")
    fill_slots_from_pair(page)
    if action == "transfer":
        page.fill("#strength", "1.5")
        page.check("#keep")
    page.click(f"#do-{action}")
    wait_for_result(page)
    assert page.evaluate("() => document.querySelector('#output-image').naturalWidth") > 0
    assert page.is_visible("#input-figure") and page.is_visible("#output-figure")  # side by side
    meta = page.evaluate("() => Object.fromEntries([...document.querySelectorAll('#meta dd')].map(d => [d.dataset.key, d.textContent]))")
    assert meta["x-model"] == "smile_glasses" and meta["x-out-of-domain"] in ("true", "false")
    assert float(meta["x-domain-score"]) > 0
    if action == "transfer":
        assert meta["x-detected-domain"] in ("smile", "glasses")
        assert "detected domain" in page.inner_text("#detected")
    screenshot(page, action)
    assert not page.console_errors, page.console_errors


def test_segment_on_a_mask_model_shows_the_mask_over_the_image(page):
    choose_model(page, "smile_glasses_mask")
    fill_slots_from_pair(page)
    page.click("#do-segment")
    wait_for_result(page)
    assert page.evaluate("() => document.querySelector('#output-image').naturalWidth") > 0
    assert page.is_visible("#overlay-figure")
    assert page.get_attribute("#overlay", "data-drawn") == "true"
    assert "x-mask-area" in page.evaluate("() => [...document.querySelectorAll('#meta dd')].map(d => d.dataset.key)")
    screenshot(page, "segment")
    assert not page.console_errors, page.console_errors


def test_interpolation_shows_a_slider_over_the_frames(page):
    choose_model(page, "smile_glasses")
    fill_slots_from_pair(page)
    page.fill("#steps", "6")
    page.click("#do-interpolate")
    wait_for_result(page)
    assert page.evaluate("() => document.querySelector('#output-image').naturalWidth") == 6 * 64  # a strip of 6 frames
    assert page.get_attribute("#frame-slider", "max") == "5"
    page.fill("#frame-slider", "3")
    assert page.inner_text("#frame-index") == "4 / 6"
    screenshot(page, "interpolate")
    page.check("#as-gif")
    page.click("#do-interpolate")
    wait_for_result(page)
    assert page.evaluate("() => document.querySelector('#output-image').naturalWidth") == 64 and page.is_hidden("#frames-figure")
    assert not page.console_errors, page.console_errors


def test_a_dropped_file_fills_its_slot(page):
    page.evaluate("""() => {
        const canvas = document.createElement('canvas'); canvas.width = canvas.height = 8;
        return new Promise(resolve => canvas.toBlob(blob => {
            const dt = new DataTransfer();
            dt.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
            document.querySelector('.slot[data-slot=guide_b]').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            resolve();
        }));
    }""")
    assert page.inner_text(".slot[data-slot=guide_b] .slot-name") == "dropped.png"
    page.wait_for_function("() => document.querySelector('.slot[data-slot=guide_b] img').naturalWidth === 8")


def test_a_problem_answer_is_shown_as_its_title_and_detail(page, server):
    choose_model(page, "smile_glasses")
    fill_slots_from_pair(page)
    text = b"not an image, just some notes\n"
    page.set_input_files(".slot[data-slot=content] input[type=file]",
                         files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": text}])
    page.click("#do-transfer")
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    problem = httpx.post(server + "/transfer", files={"content": ("notes.txt", text, "text/plain"),
                                                      "guide": ("g.png", encode_image(draw_face(1)), "image/png")}).json()
    assert problem["status"] == 415
    assert page.inner_text("#error .problem-title") == f"415 {problem['title']}"
    assert page.inner_text("#error .problem-detail") == problem["detail"]
    assert page.is_hidden("#output-figure")
    screenshot(page, "error")
    # the one console error is Chromium's own line about the 415 response
    assert all("status of 415" in e for e in page.console_errors), page.console_errors


@pytest.fixture(scope="module")
def keyed_server(chromium, tmp_path_factory) -> Iterator[str]:
    """`did serve` as `server`, but with DID_API_KEYS set: the page and samples are open, the API needs the key."""
    examples = ROOT / "examples"
    if not (examples / "index.json").is_file():
        examples = write_examples(tmp_path_factory.mktemp("keyed") / "examples")
    env = {**clean_env(), "DID_EXAMPLES": str(examples), "DID_TORCH_THREADS": "1", "DID_API_KEYS": "demo-key"}
    with running_did_serve(BUNDLED_WEIGHTS, env) as base:
        yield base


def test_with_api_keys_the_page_asks_for_one_and_then_edits(browser, keyed_server):
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.goto(keyed_server + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    assert page.is_visible("#error") and page.inner_text("#error .problem-title").startswith("401")
    assert "Enter it in the API key field above" in page.inner_text("#error .problem-detail")
    assert page.locator("#model option").count() == 0 and page.locator("#gallery .sample").count() > 0
    screenshot(page, "api-key-missing")

    page.fill("#api-key", "demo-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    assert page.is_hidden("#error")
    choose_model(page, "smile_glasses")
    fill_slots_from_pair(page)
    page.click("#do-transfer")
    wait_for_result(page)
    assert page.evaluate("() => document.querySelector('#output-image').naturalWidth") > 0
    screenshot(page, "api-key-transfer")
    context.close()
    assert all("status of 401" in e for e in errors), errors  # Chromium's own line about the first /models answer
