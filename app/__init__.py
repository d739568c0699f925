"""
The chat app: `python -m app` serves the promoted model in a Gradio chat.

    chat.py      input checks, conversation -> prompt (with truncation), streaming and rendering a reply
    models.py    loading one shared model (from store/catalog.py's candidates), switching, watching for promotions
    scores.py    the eval history (DuckDB) for the Scores tab: grouped series, a table and a plot
    ui.py        the Gradio Blocks: Chat and Scores tabs
    __main__.py  command line, /health, launch

The app only reads the store and the eval history; importer/demo.py publishes a tiny demo to chat with.
"""

import nanochat  # noqa: F401,E402  (sets torch's OpenMP wait policy before anything imports torch)
from store.catalog import TIME_FORMAT  # noqa: F401  (every time the app shows: 24-hour UTC)
