"""
python -m app.screenshot: chat with a running app in headless Chromium and save screenshots (for the README).

    python -m app.demo /tmp/nanochat-demo
    python -m app --artifacts /tmp/nanochat-demo/artifacts --duckdb /tmp/nanochat-demo/evals.duckdb &
    python -m app.screenshot --url http://127.0.0.1:7860 --out docs/chat_app.png --scores-out docs/scores.png

Uses the distribution's Chromium (apt-get install chromium) through Playwright; never `playwright install`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MESSAGES = ("Hello! What can you tell me about the sea?", "And what is AI?")


def capture(url: str, out: Path, scores_out: Path | None = None, messages: tuple[str, ...] = MESSAGES,
            timeout_ms: float = 120_000) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("`chromium` not found on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="nanochat-screenshot-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium, args=CHROMIUM_ARGS,
                                                        headless=True, viewport={"width": 1400, "height": 900})
        try:
            context.set_default_timeout(timeout_ms)
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(url, wait_until="load")  # never "networkidle": a Gradio page polls forever
            for i, message in enumerate(messages, start=1):
                page.locator("#message textarea").fill(message)
                page.locator("#send").click()
                page.wait_for_function(f"document.querySelectorAll('[data-testid=\"bot\"]').length >= {i}")
                page.locator("#status").get_by_text("tok/s").wait_for()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            print(f"saved {out}")
            if scores_out is not None:
                page.get_by_role("tab", name="Scores").click()
                page.locator("#scores-message").get_by_text("results for").wait_for()
                page.wait_for_timeout(1000)  # the plot draws after its data arrives
                scores_out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(scores_out))
                print(f"saved {scores_out}")
        finally:
            context.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m app.screenshot", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--out", type=Path, default=Path("docs/chat_app.png"))
    p.add_argument("--scores-out", type=Path, help="also screenshot the Scores tab here")
    args = p.parse_args(argv)
    capture(args.url, args.out, args.scores_out)


if __name__ == "__main__":
    main()
