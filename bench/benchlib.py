"""What every bench script shares: the stamp of a figure (machine, commit, load), RESULTS.md, running the CLI.

Each script owns one ``## `` section of ``bench/RESULTS.md`` and appends a new ``### `` entry to it per run,
leaving the other sections as they are.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


CLI = [sys.executable, "-m", "talkinghead.cli"]  # the project's CLI, in this interpreter


def run_timed(cmd: list) -> float:
    """Run ``cmd`` (echoed, ``check=True``); its wall time in seconds."""
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def machine() -> str:
    """CPU model (from lscpu) and core count, e.g. ``AMD EPYC, 2 cores``."""
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def load() -> str:
    """The 1/5/15-minute load averages, ``a / b / c``: how busy the shared cores were."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def stamp() -> str:
    """One heading line for an entry: machine, date, commit and load now."""
    return f"{machine()}; {now()}; commit {commit()}; load average {load()} (1/5/15 min)"


def append_entry(section: str, entry: str, intro: str = "") -> None:
    """Append ``entry`` at the end of the ``section`` heading's part of RESULTS.md (creating the section,
    with ``intro`` under its heading, when absent). Written to a temporary file and renamed."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n" + (f"\n{intro.strip()}\n" if intro else "")
    start = text.index(section) + len(section)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt
    text = text[:end].rstrip("\n") + "\n\n" + entry.strip("\n") + "\n" + text[end:]
    tmp = RESULTS.with_name(".RESULTS.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)
