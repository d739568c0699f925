"""
The chat app: `python -m app` serves the promoted model in a Gradio chat.

    chat.py      input checks, conversation -> prompt (with truncation), streaming and rendering a reply
    models.py    which checkpoints exist, loading one shared model, switching, watching for promotions
    scores.py    the eval history (DuckDB) for the Scores tab: grouped series, a table and a plot
    ui.py        the Gradio Blocks: Chat and Scores tabs
    __main__.py  command line, /health, launch

The app only reads the store and the eval history; importer/demo.py publishes a tiny demo to chat with.
"""

import nanochat  # noqa: F401,E402  (sets torch's OpenMP wait policy before anything imports torch)

# Every time the app shows (picker, Scores axis and table) is in this one 24-hour format, in UTC: the pipeline
# records naive UTC times, and a server's users may sit in any time zone.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
