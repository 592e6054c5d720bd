"""Printing a benchmark's markdown table and writing it where the README's figures come from."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional


def machine() -> str:
    """The CPU the figures come from (sessions may run on different ones): model and cores."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def publish(lines: list[str], footer: str, path: Optional[Path]) -> None:
    """Print the table and its footer, which names the CPU; also write them to ``path`` when
    given."""
    text = "\n".join([*lines, "", f"{footer} CPU: {machine()}."])
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def run_measured(command: list[str], timeout: float) -> tuple[Optional[int], str, str, float]:
    """Run ``command`` in a child process: its exit status (``None`` on timeout, negative for a
    signal), standard output and error, and its peak resident memory in GB (from ``wait4``)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            return None, "", "", usage.ru_maxrss / 2**20
        time.sleep(0.5)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, process.stdout.read(), process.stderr.read(), usage.ru_maxrss / 2**20
