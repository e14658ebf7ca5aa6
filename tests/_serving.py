"""Run `flash-export serve` in a process of its own, and always stop it and its Ray cluster."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil


@contextlib.contextmanager
def serving(args: list, cwd=None, env=None):
    """Run `flash-export serve ARGS` (with `env` added to the environment) until the block
    ends, then SIGTERM it: it must exit 0 and leave no Ray process behind (any left are killed,
    and the test fails)."""
    exe = Path(sys.executable).with_name("flash-export")
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-m", "flash_export"]
    process = subprocess.Popen([*cli, "serve", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd,
                               env={**os.environ, **(env or {})})
    family = []
    try:
        banner = _wait_for_banner(process, timeout=180)
        family = psutil.Process(process.pid).children(recursive=True)
        yield process, banner
    finally:
        family = family or _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            for p in left:
                p.kill()
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, process.stderr.read()[-3000:] if process.stderr else ""
    assert not left, f"Ray processes outlived `flash-export serve`: {left}"


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _wait_for_banner(process: subprocess.Popen, timeout: float) -> str:
    assert process.stdout is not None
    found: list = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not found or not found[0].startswith("serving"):
        process.kill()
        raise AssertionError(f"no start-up line in {timeout} s: {found} "
                             f"{process.stderr.read()[-3000:] if process.stderr else ''}")
    return found[0]
