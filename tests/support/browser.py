"""Debian's headless Chromium driven by Playwright, optionally inside a network namespace.

Never `playwright install`: the browser is /usr/bin/chromium (apt-get install chromium). In a
namespace, only the browser process runs there (through an `ip netns exec` launcher); Playwright
talks to it over pipes, which cross namespaces, so every page load and fetch is the device's.
"""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"  # screenshots, kept after the run


def launch_chromium(pw: Playwright, netns: str | None = None, workdir: Path | None = None) -> Browser:
    """Chromium, in namespace `netns` when given (a launcher script is written to `workdir`)."""
    assert Path(CHROMIUM).exists(), "apt-get install -y chromium (tools/deps.sh does)"
    executable = CHROMIUM
    if netns is not None:
        assert workdir is not None, "a namespace launcher needs a workdir"
        launcher = workdir / f"chromium-in-{netns}"
        launcher.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
        os.chmod(launcher, 0o755)
        executable = str(launcher)
    return pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)


def phone_context_args() -> dict:
    return {"viewport": PHONE, "device_scale_factor": 2, "is_mobile": True, "has_touch": True,
            "accept_downloads": True}


def collect_errors(page: Page) -> list[str]:
    """The page's uncaught errors and console errors, appended as they happen. An HTTP error the
    page handles (the router refusing something) is logged by Chromium too: not a page error."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    return errors
