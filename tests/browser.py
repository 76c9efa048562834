"""Headless Chromium for tests that must see a page as a browser renders it (Debian's `chromium`, installed
by `make test` where apt is available). Without it those tests skip and say why."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no headless Chromium on this machine (make test installs Debian's `chromium` when it can)")
    return found


def render(page: Path, work: Path, size: str = "1300,1800") -> tuple[Path, str]:
    """(screenshot PNG, DOM after rendering) of a local page."""
    browser = chromium()
    shot = work / "screenshot.png"
    common = [browser, *FLAGS, f"--user-data-dir={work / 'chromium-profile'}", f"--window-size={size}"]
    subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return shot, dom
