"""What gets installed: the installed packages stand above the floors of known security advisories, the serve lock
(docker/requirements-serve.txt) pins every package the service needs with hashes and is what the image installs,
`make serve` installs the serve extra alone, and building the project prints no setuptools warning."""
from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .test_deploy import DOCKERFILE, read_dockerfile

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "docker" / "requirements-serve.txt"
# The first releases without the published advisories against them (pyproject.toml's floors).
ADVISORY_FLOORS = {"pillow": "13.0.0", "python-multipart": "0.0.31", "starlette": "1.3.1"}
# The images' bases bring torch (docker/Dockerfile), so the lock leaves it out (docker/torch-from-base.txt).
FROM_BASE = {"torch"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def serve_requirements() -> list[Requirement]:
    """What an install of the serve extra needs: the core's dependencies and the extra's."""
    p = project()
    return [Requirement(r) for r in p["dependencies"] + p["optional-dependencies"]["serve"]]


def read_lock() -> dict[str, tuple[Version, list[str]]]:
    """{name: (pinned version, its sha256 hashes)} of docker/requirements-serve.txt."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    for entry in re.sub(r"\\\n", " ", LOCK.read_text()).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", entry)
        assert m, f"not a pinned, hashed requirement: {entry[:120]}"
        pins[canonicalize_name(m[1])] = (Version(m[2]), re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return pins


@pytest.mark.parametrize("name", sorted(ADVISORY_FLOORS))
def test_installed_versions_stand_above_the_advisory_floors(name):
    installed = Version(importlib.metadata.version(name))
    assert installed >= Version(ADVISORY_FLOORS[name]), f"{name} {installed} is below {ADVISORY_FLOORS[name]}"


def test_pyproject_floors_exclude_the_advisories():
    specifiers = {canonicalize_name(r.name): r.specifier for r in serve_requirements()}
    for name, floor in ADVISORY_FLOORS.items():
        lower = [Version(s.version) for s in specifiers.get(name, []) if s.operator in (">=", ">", "==", "~=")]
        assert lower and max(lower) >= Version(floor), f"pyproject.toml allows {name}{specifiers.get(name)}, below {floor}"


def test_serve_lock_pins_every_package_the_service_needs_with_hashes():
    pins = read_lock()
    for req in serve_requirements():
        name = canonicalize_name(req.name)
        if name in FROM_BASE:
            assert name not in pins, f"{name} comes with the image's base, and is not in the lock"
            continue
        assert name in pins, f"{name} (pyproject.toml) is not pinned in {LOCK.name}"
        version, hashes = pins[name]
        assert version in req.specifier, f"{LOCK.name} pins {name}=={version}, outside pyproject.toml's {req}"
        assert hashes, f"{name} has no hash"
    for name, floor in ADVISORY_FLOORS.items():
        assert pins[name][0] >= Version(floor), f"{LOCK.name} pins {name} below {floor}"
    # nothing of torch's own stack (it comes with the base): no CUDA libraries, no triton
    assert not [n for n in pins if n.startswith("nvidia-") or n == "triton"]


def test_serve_lock_pins_what_this_environment_runs():
    """The lock should be what the tests run on. A release that came out after the lock was written makes a fresh
    install differ from it: that is a warning (refresh the lock, docs/deploy.md "The serve lock"), not a failure."""
    differ = []
    for name, (version, _) in read_lock().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != version:
            differ.append(f"{name}: lock {version}, installed {installed}")
    if differ:
        warnings.warn(f"{LOCK.name} differs from the tested environment: " + "; ".join(differ), stacklevel=1)


def test_image_installs_the_lock_with_hashes_then_the_project_alone():
    df = read_dockerfile(DOCKERFILE)
    stage = df.stages[-1]
    copies = [rest.split() for kw, rest in stage.instructions if kw == "COPY"]
    assert any(c[0] == "docker/requirements-serve.txt" for c in copies), "the image does not copy the lock"
    (install,) = [rest for kw, rest in stage.instructions if kw == "RUN" and "pip install" in rest]
    first, _, second = install.partition("&&")
    assert "--require-hashes" in first and re.search(r"-r \S*docker/requirements-serve\.txt", first), first
    assert "--no-deps" in second and "/tmp/src" in second, second


def test_make_serve_installs_the_serve_extra_alone(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "serve", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    installs = [line for line in r.stdout.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("'.[serve]'" in line for line in installs), installs
    assert not re.search(r"\[[^]]*\b(dev|train)\b", r.stdout), r.stdout


@pytest.mark.parametrize("build", ["build_editable", "build_wheel"])
def test_building_the_project_raises_no_setuptools_warning(tmp_path, build):
    """The build step of `pip install -e .` and of `pip install .` (setuptools' hook, on a copy of the sources, with
    this environment's setuptools) warns nothing; pip shows such warnings as BuildBackendWarning."""
    pytest.importorskip("setuptools")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("models", "training", "app"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(f"""
        import warnings
        import setuptools.build_meta as backend
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend.{build}({str(out)!r})
        for w in caught:
            print("WARNING", w.category.__name__, str(w.message).strip().splitlines()[0])
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert list(out.glob("did-*.whl")), r.stdout[-2000:]
    raised = [line for line in r.stdout.splitlines() if line.startswith("WARNING ")]
    assert not raised, "\n".join(raised)
