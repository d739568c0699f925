"""
The Gradio app: a Chat tab (streaming replies, example prompts, stop, Gradio's own retry / undo / clear on the chat,
export, sampling controls, the model picker) and a Scores tab (the eval history by group, as a plot and a sortable
table), plus GET /health.

Each browser session keeps its conversation in a gr.State: {"messages": the conversation in the tokenizer's format,
"display": what the Chatbot shows (the same turns rendered as markdown, plus notices), "replies": per assistant
turn, which model wrote it and how fast}. The model itself is shared by all sessions (app.models.ModelManager).

Every handler catches its own exceptions and shows them (in the chat or the status line): one bad request never
takes the server down.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from app.chat import (
    MAX_INPUT_CHARS,
    InputError,
    build_prompt,
    clean_message,
    default_max_tokens,
    reply_room,
    stream_reply,
)
from app.models import ModelManager, describe, is_failure
from app.scores import read_scores
from store.eval_queries import SCORE_GROUPS

log = logging.getLogger("app")

# The UI takes no files, but Gradio serves POST /gradio_api/upload for every app and stores what it gets in its temp
# dir. Passed to launch(max_file_size=...): a bigger upload is refused with 413 while it streams in, never stored.
MAX_UPLOAD_BYTES = 4096

EXAMPLES = ("Hello! Who are you?", "Write a short poem about the sea.", "What is 12 times 37?",
            "Explain in two sentences what a neural network is.")
CSS = """
#status, #serving { font-size: 0.9em; }
footer { display: none !important; }
"""


def new_session() -> dict[str, list]:
    return {"messages": [], "display": [], "replies": []}


def notice(title: str, detail: str) -> dict[str, Any]:
    """A boxed chat bubble that is not part of the conversation (the model never sees it): truncation, errors.
    The title is what always shows (Gradio may fold the detail away), so it carries the whole message."""
    return {"role": "assistant", "content": detail, "metadata": {"title": title}}


def dropped(n: int) -> str:
    return "the oldest exchange" if n == 1 else f"the {n} oldest exchanges"


def _copy(state: dict | None) -> dict[str, list]:
    state = state or new_session()
    return {k: list(state.get(k, [])) for k in ("messages", "display", "replies")}


def _drop_unanswered(state: dict) -> None:
    """A user turn whose reply failed or was stopped before any token stays on screen but leaves the model's
    conversation, so the conversation keeps alternating user/assistant."""
    if state["messages"] and state["messages"][-1]["role"] == "user":
        state["messages"].pop()


# -----------------------------------------------------------------------------
# Chat handlers (generators: every yield streams to the browser)


def _refuse(state: dict, title: str, detail: str, status: str | None = None) -> tuple[list, dict, str]:
    """The reply cannot be written: a notice says why, and the unanswered message leaves the conversation."""
    state = _copy(state)
    _drop_unanswered(state)
    state["display"].append(notice(title, detail))
    return state["display"], state, status or title


def generate(manager: ModelManager, state: dict, temperature: float, top_k: float, max_tokens: float, *,
             stream_every: float = 0.0) -> Iterator[tuple[list, dict, str]]:
    """Reply to the conversation in state (it ends with a user message): yield (display, state, status) as tokens
    arrive, at most once per `stream_every` seconds (each update costs the server a few ms: with a fast model,
    rendering every token would cost more than generating it)."""
    loaded = manager.current
    if loaded is None:
        yield _refuse(state, "⚠️ No model loaded: pick one in the model list",
                      "Or start the app with --checkpoint DIR, or promote a model.", "⚠️ No model loaded.")
        return
    messages, display = state["messages"], state["display"]
    try:
        sequence_len = loaded.model.config.sequence_len
        prompt = build_prompt(loaded.tokenizer, messages, sequence_len, reply_room(sequence_len, int(max_tokens)))
        if n := prompt.dropped_exchanges:
            display.append(notice(
                f"✂️ Context truncated: {dropped(n)} no longer {'fits' if n == 1 else 'fit'} the model's "
                f"{sequence_len}-token context", "This reply is written without it. Start a new chat to begin afresh."))
        # The reply stops at the model's sequence length too: it was never trained to attend further back.
        replies = stream_reply(loaded.engine, prompt.tokens, max_tokens=min(int(max_tokens), sequence_len -
                               len(prompt.tokens)), temperature=float(temperature), top_k=int(top_k),
                               seed=random.randrange(2**31), step_lock=manager.step_lock)

        def with_reply(reply) -> dict:
            shown = {"role": "assistant", "content": reply.markdown()}
            return {**state, "messages": messages + [reply.message()], "display": display + [shown]}

        reply, last_update = None, None
        for reply in replies:
            now = time.perf_counter()
            if reply.done:
                break  # shown below, with its speed
            if last_update is not None and now - last_update < stream_every:
                continue  # keep generating; the next update shows these tokens too
            last_update = now
            streaming = with_reply(reply)
            yield streaming["display"], streaming, f"Generating… {reply.num_tokens} tokens"
        manager.record_reply(reply.num_tokens, reply.seconds, loaded.candidate.id)
        done = with_reply(reply)
        done["replies"] = done["replies"] + [{"model": loaded.candidate.id, "sha256": loaded.sha256,
                                              "step": loaded.step, "tokens": reply.num_tokens,
                                              "tok_per_sec": round(reply.tok_per_sec, 1)}]
        status = (f"{reply.num_tokens} tokens in {reply.seconds:.2f} s = **{reply.tok_per_sec:.1f} tok/s** "
                  f"· {loaded.candidate.label()}")
        if prompt.dropped_exchanges:
            status += f" · ✂️ {dropped(prompt.dropped_exchanges)} left out of the context"
        yield done["display"], done, status
    except InputError as e:
        yield _refuse(state, f"⚠️ Not sent: {e}", "Edit the message and send it again.", f"⚠️ {e}")
    except BaseException as e:  # a Rust panic from the tokenizer is a BaseException; stopping (GeneratorExit) is not
        if not is_failure(e):
            raise
        log.exception("reply failed")
        yield _refuse(state, f"⚠️ The reply failed: {type(e).__name__}: {e}",
                      "The server logged the details; other chats are not affected.")


def respond(manager: ModelManager, max_chars: int, message: str, state: dict, temperature: float, top_k: float,
            max_tokens: float, *, stream_every: float = 0.0) -> Iterator[tuple[Any, list, dict, str]]:
    """Send: check the message, show it, stream the reply. Yields (textbox, chatbot, state, status)."""
    state = _copy(state)
    try:
        text = clean_message(message, max_chars)
    except InputError as e:
        gr.Warning(str(e))
        # The textbox keeps what was typed (gr.skip: nothing is sent back, not even a 1 MB paste).
        yield gr.skip(), state["display"], state, f"⚠️ {e}"
        return
    _drop_unanswered(state)
    state["messages"].append({"role": "user", "content": text})
    state["display"].append({"role": "user", "content": text})
    yield "", state["display"], state, "Thinking…"
    for display, streamed, status in generate(manager, state, temperature, top_k, max_tokens,
                                              stream_every=stream_every):
        yield gr.skip(), display, streamed, status


def regenerate(manager: ModelManager, state: dict, temperature: float, top_k: float, max_tokens: float, *,
               stream_every: float = 0.0) -> Iterator[tuple[list, dict, str]]:
    """Replace the last reply with a new sample (a fresh seed)."""
    state = _copy(state)
    if not state["messages"]:
        yield state["display"], state, "Nothing to regenerate yet: send a message first."
        return
    if state["messages"][-1]["role"] == "assistant":
        state["messages"].pop()
        state["replies"] = state["replies"][:-1]
    # Everything shown after the last user message (the reply, notices) goes.
    last_user = max(i for i, m in enumerate(state["display"]) if m["role"] == "user")
    state["display"] = state["display"][: last_user + 1]
    yield state["display"], state, "Regenerating…"
    yield from generate(manager, state, temperature, top_k, max_tokens, stream_every=stream_every)


def example_text(picked: gr.SelectData) -> str:
    return picked.value["text"]


def undo(state: dict) -> tuple[Any, list, dict, str]:
    """Take back the last message and its reply; the message goes back into the textbox (as gr.ChatInterface does).
    Returns (textbox, chatbot, state, status)."""
    state = _copy(state)
    users = [i for i, m in enumerate(state["display"]) if m["role"] == "user"]
    if not users:
        return gr.skip(), state["display"], state, "Nothing to undo."
    text = state["display"][users[-1]]["content"]
    answered = any(m["role"] == "assistant" and "metadata" not in m for m in state["display"][users[-1]:])
    state["display"] = state["display"][: users[-1]]
    if state["messages"] and state["messages"][-1]["role"] == "user":  # sent, not answered (yet)
        state["messages"].pop()
    elif answered:  # a refused or failed message never joined the conversation: nothing to take out of it
        state["messages"], state["replies"] = state["messages"][:-2], state["replies"][:-1]
    return text, state["display"], state, "Took back the last message."


def export_conversation(manager: ModelManager, export_dir: Path, state: dict) -> str:
    """The conversation as a JSON file (a download): messages in the tokenizer's format, and which model replied."""
    state = _copy(state)
    if not state["messages"]:
        raise gr.Error("Nothing to export yet: the conversation is empty.")
    stamp = datetime.now(timezone.utc)
    document = {
        "exported_at": stamp.isoformat(timespec="seconds"),
        "format": "nanochat conversation: messages alternate user/assistant; assistant content is text or parts "
                  "(text, python = calculator expression, python_output = its result)",
        "messages": state["messages"],
        "replies": state["replies"],
        "model_at_export": manager.health()["checkpoint"],
    }
    path = export_dir / f"nanochat-conversation-{stamp.strftime('%Y%m%dT%H%M%S%f')}.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
    return str(path)


# -----------------------------------------------------------------------------
# Models


def picker_update(manager: ModelManager) -> dict:
    """Every candidate as (label, id), and the id of the model being served."""
    current = manager.current.candidate if manager.current else None
    choices = [(c.label(), c.id) for c in manager.candidates]
    if current and current.id not in {c.id for c in manager.candidates}:
        choices.insert(0, (current.label(), current.id))
    return gr.update(choices=choices, value=current.id if current else None)


def max_tokens_update(manager: ModelManager) -> dict:
    """The slider fits the served model: up to its context, starting at default_max_tokens."""
    context = manager.current.model.config.sequence_len if manager.current else 2048
    return gr.update(maximum=context, value=default_max_tokens(context))


def serving_line(manager: ModelManager) -> str:
    line = f"**Serving:** {describe(manager.current)} · device `{manager.device}`"
    if manager.last_reply and manager.last_reply.get("tok_per_sec") is not None:
        line += f" · last reply {manager.last_reply['tok_per_sec']} tok/s"
    return line


def switch_model(manager: ModelManager, candidate_id: str) -> Iterator[tuple[dict, str, str, dict]]:
    """Load the picked model for everyone (the model is shared). Yields (picker, serving line, status, max tokens)."""
    if not candidate_id:
        yield picker_update(manager), serving_line(manager), "Pick a model from the list.", gr.skip()
        return
    try:
        candidate = manager.find(candidate_id)
        yield gr.skip(), serving_line(manager), f"Loading {candidate.label()}…", gr.skip()
        loaded = manager.load(candidate_id)
        yield (picker_update(manager), serving_line(manager), f"Switched to {loaded.candidate.label()} (loaded in "
               f"{loaded.load_seconds:.1f} s) — for every user.", max_tokens_update(manager))
    except Exception as e:
        log.exception("switching to %s failed", candidate_id)
        yield (picker_update(manager), serving_line(manager),
               f"⚠️ Could not load that model: {type(e).__name__}: {e}", gr.skip())


def refresh_models(manager: ModelManager) -> tuple[dict, str]:
    manager.refresh()  # never raises: what it cannot read becomes a note
    notes = "; ".join(manager.notes)
    return picker_update(manager), f"{len(manager.candidates)} checkpoints found." + (f" ({notes})" if notes else "")


def tick(manager: ModelManager) -> tuple[str, dict, dict]:
    """Every few seconds: the serving line, and the offer of a newly promoted model (when not auto-reloading)."""
    offer = manager.offer
    banner = f"🆕 **A new model was promoted:** {offer.label()}" if offer else ""
    return serving_line(manager), gr.update(value=banner, visible=bool(offer)), gr.update(visible=bool(offer))


def accept_offer(manager: ModelManager) -> Iterator[tuple[dict, str, str, dict]]:
    if manager.offer is None:
        yield picker_update(manager), serving_line(manager), "No new model to switch to.", gr.skip()
        return
    yield from switch_model(manager, manager.offer.id)


def scores_view(db_path: Path | None, group: str | None, selected: str | None) -> tuple:
    """(group radio, series dropdown, plot, table, message) of the Scores tab."""
    if db_path is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "No eval history configured (--duckdb)."
    scores = read_scores(db_path, group, selected)
    if not scores.groups:  # busy, unreadable or empty: keep what is on screen, say why nothing changed
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), scores.message
    return (gr.update(choices=list(scores.groups), value=scores.group),
            gr.update(choices=scores.groups[scores.group], value=scores.selected), scores.plot(), scores.table,
            scores.message)


# -----------------------------------------------------------------------------
# Layout


def initial(update: dict) -> dict:
    """A gr.update(...) as a component's constructor arguments (one function serves the first render and updates)."""
    return {k: v for k, v in update.items() if k != "__type__"}


def build_ui(manager: ModelManager, db_path: Path | None, max_input_chars: int = MAX_INPUT_CHARS,
             poll_seconds: float = 5.0, stream_every: float = 0.05) -> gr.Blocks:
    export_dir = Path(tempfile.mkdtemp(prefix="nanochat-exports-"))
    with gr.Blocks(title="nanochat") as demo:
        state = gr.State(new_session())
        with gr.Row():
            gr.Markdown("## nanochat")
            serving = gr.Markdown(serving_line(manager), elem_id="serving")
        with gr.Row():
            banner = gr.Markdown(visible=False, elem_id="banner")
            accept = gr.Button("Switch to the new model", visible=False, size="sm", scale=0)
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=4):
                    chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot", buttons=["copy"],
                                         examples=[{"text": text} for text in EXAMPLES],
                                         placeholder="Ask something, or start from an example. Arithmetic goes "
                                                     "through the calculator tool.")
                    with gr.Row():
                        textbox = gr.Textbox(placeholder=f"Message (up to {max_input_chars:,} characters)",
                                             show_label=False, lines=1, max_lines=8, scale=6, autofocus=True,
                                             elem_id="message")
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                        export = gr.Button("Export", scale=1, elem_id="export")
                    status = gr.Markdown("", elem_id="status")
                    export_file = gr.File(label="Conversation (JSON)", visible=False, elem_id="export-file")
                with gr.Column(scale=2):
                    picker = gr.Dropdown(label="Model (★ served promotion, ↩ earlier ones)", elem_id="picker",
                                         **initial(picker_update(manager)))
                    refresh = gr.Button("Refresh list", size="sm")
                    temperature = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Temperature (0 = greedy)")
                    top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)")
                    max_tokens = gr.Slider(1, label="Max tokens per reply", step=1, elem_id="max-tokens",
                                           **initial(max_tokens_update(manager)))
        with gr.Tab("Scores") as scores_tab:
            with gr.Row():
                group = gr.Radio(list(SCORE_GROUPS), label="Group", scale=3, elem_id="score-group")
                series = gr.Dropdown(label="Score", choices=[], scale=3, elem_id="score-series")
                reload_scores = gr.Button("Refresh", size="sm", scale=0)
            scores_message = gr.Markdown(elem_id="scores-message")
            plot = gr.Plot(label="Eval history (UTC)", elem_id="scores-plot")
            table = gr.Dataframe(label="Results (click a header to sort)", interactive=False, elem_id="scores-table")

        # Chat events. Stop cancels a streaming reply; what streamed so far stays in the chat.
        sampling = [temperature, top_k, max_tokens]
        chat = partial(respond, manager, max_input_chars, stream_every=stream_every)
        chat_out = [textbox, chatbot, state, status]
        send_event = send.click(chat, [textbox, state, *sampling], chat_out, api_name="chat")
        submit_event = textbox.submit(chat, [textbox, state, *sampling], chat_out, api_visibility="private")
        example_event = chatbot.example_select(example_text, None, textbox,
                                               api_visibility="private").then(chat, [textbox, state, *sampling],
                                                                              chat_out, api_visibility="private")
        again = partial(regenerate, manager, stream_every=stream_every)
        regen_event = chatbot.retry(again, [state, *sampling], [chatbot, state, status], api_name="regenerate")
        replies = [send_event, submit_event, example_event, regen_event]
        stop.click(None, None, None, cancels=replies)
        chatbot.undo(undo, state, chat_out, api_name="undo", cancels=replies)
        chatbot.clear(lambda: ([], new_session(), "New chat.", gr.update(value=None, visible=False)), None,
                      [chatbot, state, status, export_file], api_name="new_chat", cancels=replies)
        export.click(lambda s: gr.update(value=export_conversation(manager, export_dir, s), visible=True), state,
                     export_file, api_name="export")

        # Models: switching changes the model for every user (there is one shared model).
        model_out = [picker, serving, status, max_tokens]
        picker.input(partial(switch_model, manager), picker, model_out, api_name="switch_model")
        accept.click(partial(accept_offer, manager), None, model_out, api_name="accept_new_model")
        refresh.click(partial(refresh_models, manager), None, [picker, status], api_name="refresh_models")
        gr.Timer(poll_seconds).tick(partial(tick, manager), None, [serving, banner, accept],
                                    api_visibility="private", show_progress="hidden", concurrency_limit=None)
        demo.load(lambda: (serving_line(manager), picker_update(manager), max_tokens_update(manager)), None,
                  [serving, picker, max_tokens], api_visibility="private")

        # Scores: read when the tab opens and on demand (short read-only DuckDB connections).
        show_scores = partial(scores_view, db_path)
        scores_out = [group, series, plot, table, scores_message]
        scores_tab.select(show_scores, [group, series], scores_out, api_visibility="private")
        group.input(lambda g: show_scores(g, None), group, scores_out, api_visibility="private")
        series.input(show_scores, [group, series], scores_out, api_visibility="private")
        reload_scores.click(show_scores, [group, series], scores_out, api_name="scores")
    return demo
