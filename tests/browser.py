"""A real headless browser for UI tests: Debian's Chromium driven by Playwright (no `playwright install`).

Playwright's own browser downloads need the internet, so the tests use the distribution's `chromium` package
(`apt-get install chromium chromium-driver`, scripts/system-deps.sh) through `executable_path`. The flags are the set
verified in ../shared/ENVIRONMENT.md: no sandbox (containers), no GPU, and no background traffic to Google services that
would only time out offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str:
    """The Debian `chromium` on PATH; a clear error (not a skip) when it is missing."""
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("`chromium` not found on PATH: apt-get install -y chromium chromium-driver "
                           "(scripts/system-deps.sh does this); never `playwright install`")
    return found


def artifact_dir() -> Path:
    """Where tests leave screenshots for humans: $NANOCHAT_TEST_ARTIFACTS (CI keeps it), else a fresh tmp dir."""
    configured = os.environ.get("NANOCHAT_TEST_ARTIFACTS")
    path = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="nanochat-test-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium_page(profile_dir: str | os.PathLike[str], viewport: tuple[int, int] = (1600, 1000),
                  timeout_ms: float = 30_000) -> Iterator[Page]:
    """One page of a headless Chromium whose profile lives in profile_dir (a tmp dir: nothing leaks between
    tests). Closing the context on exit ends the browser process, whether or not the test failed."""
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=chromium_binary(),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            context.set_default_timeout(timeout_ms)
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
