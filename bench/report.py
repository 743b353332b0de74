"""Writes benchmark tables into docs/benchmarks.md, one marked section per benchmark, so several benchmarks can
refresh their own table without touching the others."""
from __future__ import annotations

import datetime as _dt
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table below was written by the benchmark named in its section, with its command line, machine and date.\n"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    """A one-line description of the machine the benchmark runs on."""
    if torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        try:
            model = next(
                (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU",
            )
        except OSError:
            model = platform.processor() or "unknown CPU"
        from models.checkpoint import cpu_has_bf16

        bf16 = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_bf16() else "no native bf16"
        dev = f"CPU only: {model}, {bf16}, {torch.get_num_threads()} torch threads"
    return f"{dev}; {platform.system()} {platform.machine()}; Python {platform.python_version()}; PyTorch {torch.__version__}"


def write_section(name: str, title: str, body: str, doc: Path = DOC) -> Path:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`, stamped with command, machine, date.

    On a machine with CUDA the section is `name-gpu`, so the CPU and GPU tables of one benchmark stand side by side."""
    if torch.cuda.is_available():
        name, title = f"{name}-gpu", f"{title} (GPU)"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=doc.parent).stdout.strip()
    except OSError:
        rev = ""
    stamp = (
        f"- command: `{' '.join(['python', '-m', 'bench.' + Path(sys.argv[0]).stem] + sys.argv[1:])}`\n"
        f"- machine: {machine()}\n- date: {_dt.date.today().isoformat()}" + (f"; commit {rev}" if rev else "") + "\n"
    )
    section = f"<!-- bench:{name} -->\n## {title}\n\n{stamp}\n{body.strip()}\n<!-- /bench:{name} -->"
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    return doc
