"""
python -m app (or nanochat-chat): chat in the browser with the model the pipeline promoted.

    python -m app                                        # promoted model in $NANOCHAT_ARTIFACTS, http://127.0.0.1:7860
    python -m app --checkpoint ~/.cache/nanochat/chatsft_checkpoints/d20       # a nanochat checkpoint dir
    python -m app --artifacts s3://bucket/prefix --auto-reload --auth alice:secret --concurrency 8

GET /health answers JSON: the model served, its checkpoint sha256 and step, the device, the last reply's tok/s and
the promotion pointer last seen (no auth: it is meant for load balancers and uptime checks).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from app.chat import MAX_INPUT_CHARS
from store import home  # the state root the pipeline and the UI write to


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--auth", action="append", metavar="USER:PASS",
                   help="require a login (repeat for several users); or set NANOCHAT_APP_AUTH=user:pass")
    p.add_argument("--checkpoint", metavar="DIR", help="serve this nanochat checkpoint dir (model_<step>.pt + meta)")
    p.add_argument("--step", type=int, help="step of --checkpoint to load (default: the last)")
    p.add_argument("--tokenizer-dir", metavar="DIR", help="tokenizer of --checkpoint (default: <base dir>/tokenizer "
                                                          "for a dir in the standard <base dir>/<phase>/<tag> layout)")
    p.add_argument("--artifacts", default=home.artifacts_url(), metavar="URL",
                   help="artifact store: a directory or s3://bucket/prefix (default $NANOCHAT_ARTIFACTS, else "
                        "$NANOCHAT_HOME/artifacts, NANOCHAT_HOME defaulting to .nanochat-dagster); '' for none")
    p.add_argument("--duckdb", metavar="PATH", help="eval history (default $NANOCHAT_DUCKDB, else "
                                                    "$NANOCHAT_HOME/evals.duckdb)")
    p.add_argument("--device", help="cpu, cuda, mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights' dtype (auto: bf16 on CUDA and on CPUs with bf16 hardware, else fp32)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch CPU threads (default: half the cores, leaving the rest to the web server)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="replies streamed at once (the model is shared; chats take turns token by token); more "
                        "requests wait in the queue")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that are refused")
    p.add_argument("--max-input-chars", type=int, default=MAX_INPUT_CHARS, help="longest message accepted")
    p.add_argument("--stream-every", type=float, default=0.05, metavar="SECONDS",
                   help="send the browser at most one update per this many seconds while a reply streams (0: every "
                        "token; a fast model outruns what updating the page costs)")
    p.add_argument("--auto-reload", action="store_true",
                   help="switch to a newly promoted model by itself (default: offer it in the app)")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="how often to check for a new promotion")
    args = p.parse_args(argv)
    if args.step is not None and not args.checkpoint:
        p.error("--step needs --checkpoint")
    if args.concurrency < 1 or args.max_input_chars < 1 or args.threads < 1:
        p.error("--concurrency, --max-input-chars and --threads must be at least 1")
    if args.stream_every < 0 or args.poll_seconds <= 0:
        p.error("--stream-every must be >= 0 and --poll-seconds > 0")
    args.auth = parse_auth(p, args.auth or ([os.environ["NANOCHAT_APP_AUTH"]] if os.environ.get("NANOCHAT_APP_AUTH")
                                           else []))
    return args


def parse_auth(p: argparse.ArgumentParser, values: list[str]) -> list[tuple[str, str]] | None:
    pairs = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            p.error(f"--auth takes USER:PASS, got {value.split(':')[0]!r}:…")
        pairs.append((user, password))
    return pairs or None


def add_health_route(app, manager) -> None:
    """GET /health on the Gradio server's FastAPI app, ahead of Gradio's own routes."""
    from fastapi.responses import JSONResponse

    app.add_api_route("/health", lambda: JSONResponse(manager.health()), methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # No usage analytics calls from a team's internal server (and none that time out on an offline machine).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after parsing: --help stays fast, and torch's threads are set before any model exists.
    import torch

    from app.models import ModelManager
    from app.ui import CSS, MAX_UPLOAD_BYTES, build_ui
    from nanochat.common import autodetect_device_type
    from store.artifact_store import artifact_store_from_url
    from store.catalog import local_candidate

    torch.set_num_threads(args.threads)
    device = args.device or autodetect_device_type()
    store = artifact_store_from_url(args.artifacts) if args.artifacts else None
    db_path = Path(args.duckdb) if args.duckdb else home.duckdb_path()
    local = local_candidate(args.checkpoint, args.tokenizer_dir, args.step) if args.checkpoint else None
    manager = ModelManager(store, db_path, device, local, auto_reload=args.auto_reload, dtype=args.dtype)
    manager.refresh()
    for note in manager.notes:
        logging.getLogger("app").warning("%s", note)
    if manager.load_default() is None:
        logging.getLogger("app").warning("no model to serve yet (nothing promoted in %s); the app starts anyway and "
                                         "loads one as soon as it is promoted", args.artifacts or "no store")

    demo = build_ui(manager, db_path, args.max_input_chars, poll_seconds=min(args.poll_seconds, 5.0),
                    stream_every=args.stream_every)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    app, url, share_url = demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                                      auth=args.auth, prevent_thread_lock=True, css=CSS, footer_links=[],
                                      max_file_size=MAX_UPLOAD_BYTES)
    add_health_route(app, manager)
    manager.start_watcher(args.poll_seconds)
    print(f"nanochat app: {url} (health: {url.rstrip('/')}/health){f', public: {share_url}' if share_url else ''}",
          flush=True)
    try:
        demo.block_thread()
    finally:
        manager.stop()
        demo.close()


if __name__ == "__main__":
    main()
