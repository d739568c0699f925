"""
What each asset's materialization shows in the Dagster UI: every asset builds its metadata through this module.

- Only the headline numbers (HEADLINE) are numeric metadata, so the asset page's "Plots" view holds the curves
  worth watching across runs; every other number is text rounded to 4 significant digits (`number` reads one back,
  for the checks and stages that consume an upstream's metadata).
- Training curves are a PNG drawn with matplotlib, inside markdown metadata: Dagster 1.13 has no image type, and
  renders a data: URI image in the dialog its "[Show Markdown]" link opens (checked in Chromium, test_webserver.py).
- Per-task scores are tables (TableMetadataValue with a schema); samples are markdown; MFU only on a GPU, where the
  peak FLOP/s it divides by is known.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from store.home import artifacts_url

HEADLINE = frozenset({"val_bpb", "core", "chatcore", "tok_per_sec"})


def store_kind() -> str:
    """The artifact store's kind tag: from NANOCHAT_ARTIFACTS (the resource's default) as the code location loads."""
    return "s3" if artifacts_url().startswith("s3://") else "filesystem"


def sig4(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


def as_text(v: int | float) -> str:
    """A number as a person reads it: integers whole, floats to 4 significant digits, no exponent for 0.001-1e6."""
    if isinstance(v, int):
        return str(v)
    r = sig4(float(v))
    if math.isfinite(r) and (r == 0 or 1e-3 <= abs(r) < 1e6):
        return repr(r).removesuffix(".0")
    return f"{r:.4g}"


def parse(v: Any) -> float | int | None:
    """A metadata value as a number (a float, or text written by `as_text`); None when it is not one."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        return int(v) if str(v).lstrip("-").isdigit() else float(v)
    except (TypeError, ValueError):
        return None


def number(meta: Mapping[str, Any], key: str) -> float | int | None:
    return parse(meta.get(key))


def rounded(v: Any) -> Any:
    """Floats anywhere in a JSON-like value rounded to 4 significant digits."""
    if isinstance(v, float):
        return sig4(v)
    if isinstance(v, Mapping):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [rounded(x) for x in v]
    return v


def value(key: str, v: Any) -> dg.MetadataValue | None:
    """The metadata value of one entry (None: leave the entry out)."""
    if v is None or isinstance(v, dg.MetadataValue):
        return v
    if isinstance(v, bool):
        return dg.MetadataValue.text(str(v).lower())
    if isinstance(v, (int, float)):
        return dg.MetadataValue.float(sig4(float(v))) if key in HEADLINE else dg.MetadataValue.text(as_text(v))
    if isinstance(v, (Mapping, list, tuple)):
        return dg.MetadataValue.json(rounded(v))
    return dg.MetadataValue.text(str(v))


# The UI lists entries in this order: what a person looks for first, then the rest as given, the run config last.
GLANCE = ("promoted", "val_bpb", "core", "core_label", "chatcore", "chatcore_label", "tok_per_sec", "loss_trend",
          "loss_curve", "core_tasks", "chat_tasks", "samples", "vocab_size", "compression", "num_shards", "documents",
          "corpus")


def entries(values: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    def rank(key: str) -> int:
        return GLANCE.index(key) if key in GLANCE else len(GLANCE) + (key == "config")
    return {k: mv for k in sorted(values, key=rank) if (mv := value(k, values[k])) is not None}


# --- pictures and tables ------------------------------------------------------------------------------------------


def curves_png(panels: Mapping[str, Sequence[Sequence[float]]]) -> bytes:
    """One small line chart per panel ({title: [(step, value), ...]}) side by side, as PNG bytes."""
    # Imported here: matplotlib costs ~0.5 s, which every load of the code location would pay otherwise.
    from matplotlib.figure import Figure  # Figure alone (no pyplot): no global state, no GUI backend

    fig = Figure(figsize=(3.6 * len(panels), 2.4), dpi=90)
    for i, (title, points) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o" if len(points) < 12 else None, markersize=3, linewidth=1.5)
        ax.set_title(f"{title} (last {as_text(ys[-1])})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def sparkline(values: Sequence[float], width: int = 32) -> str:
    """A curve as text, first and last value around it: the UI shows short text inline, where an image needs a click."""
    stride = math.ceil(len(values) / width)
    values = list(values)[::stride] + ([values[-1]] if (len(values) - 1) % stride else [])
    finite = [v for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    bars = "".join("▁▂▃▄▅▆▇█"[round(7 * (v - low) / (high - low)) if high > low else 0] if math.isfinite(v) else "×"
                   for v in values)
    return f"{as_text(values[0])} {bars} {as_text(values[-1])}"


def image_md(alt: str, png: bytes) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def table(columns: Mapping[str, str], rows: Sequence[Sequence[Any]]) -> dg.TableMetadataValue:
    """A table with a schema ({column: type}: string, float, int); floats to 4 significant digits."""
    def cell(v):
        return sig4(v) if isinstance(v, float) else v
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns.items()])
    records = [dg.TableRecord(dict(zip(columns, map(cell, row)))) for row in rows]
    return dg.MetadataValue.table(records, schema=schema)


def table_md(t: dg.TableMetadataValue) -> str:
    """A metadata table as markdown (the report card prints the same tables)."""
    names = [c.name for c in t.schema.columns]
    lines = ["| " + " | ".join(names) + " |", "|---|" + "---:|" * (len(names) - 1)]
    for record in t.records:
        cells = ["" if record.data.get(n) is None else as_text(record.data[n])
                 if isinstance(record.data[n], (int, float)) else str(record.data[n]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def md_escape(text: str) -> str:
    """Model output shown as text: markdown and HTML characters escaped, newlines kept as line breaks."""
    out = "".join("\\" + c if c in "\\`*_{}[]<>()#+-!|~" else c for c in text.strip())
    return out.replace("\n", "  \n") or "*(empty)*"


def samples_md(samples: Sequence) -> dg.MetadataValue:
    """Base samples (prompt + continuation) as a numbered list; chat samples ([question, reply]) as Q/A pairs."""
    parts = []
    for i, s in enumerate(samples, 1):
        if isinstance(s, (list, tuple)) and len(s) == 2:
            parts.append(f"**{i}. Q:** {md_escape(str(s[0]))}  \n**A:** {md_escape(str(s[1]))}")
        else:
            parts.append(f"**{i}.** {md_escape(str(s))}")
    return dg.MetadataValue.md("\n\n".join(parts))


# --- per asset -----------------------------------------------------------------------------------------------------

TRAINING_NUMBERS = ("val_bpb", "min_val_bpb", "val_loss", "final_loss", "tok_per_sec", "flops_per_sec", "num_params",
                    "total_training_time")


def training(result: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], device_type: str) -> dict[str, Any]:
    """The numbers, curves and samples a training stage reported (loss per step; val bpb/loss per eval)."""
    out: dict[str, Any] = {k: result.get(k) for k in TRAINING_NUMBERS}
    if device_type == "cuda":  # on CPU the child reports 0: there is no peak FLOP/s to divide by
        out["mfu"] = result.get("mfu")
    panels = {"train loss": result.get("loss_curve") or []}
    # The curve counts this process's steps from 1: after a resume, fewer than `step`.
    out["steps_trained"] = int(panels["train loss"][-1][0]) if panels["train loss"] else 0
    for metric in ("val_bpb", "val_loss"):
        panels[metric.replace("_", " ")] = [(m["step"], m[metric]) for m in messages if m.get(metric) is not None]
    panels = {title: points for title, points in panels.items() if points}
    if panels.get("train loss"):
        out["loss_trend"] = sparkline([loss for _, loss in panels["train loss"]])
    out["loss_curve"] = image_md("loss", curves_png(panels)) if panels else "no steps"
    if result.get("samples"):
        out["samples"] = samples_md(result["samples"])
    return out


def core_table(tasks: Mapping[str, Mapping[str, Any]]) -> dg.TableMetadataValue:
    return table({"task": "string", "accuracy": "float", "centered": "float", "random baseline %": "float",
                  "examples": "int"},
                 [[k, t["accuracy"], t["centered"], t["random_baseline"], t["examples"]] for k, t in tasks.items()])


def chat_table(results: Mapping[str, Mapping[str, Any]]) -> dg.TableMetadataValue:
    """One row per ChatCORE task: each stage's accuracy, and the last stage's centred accuracy and examples."""
    per_stage = {stage: r.get("chat_tasks") or {} for stage, r in results.items()}
    last = list(per_stage)[-1]
    columns = {"task": "string", **{f"{stage} accuracy": "float" for stage in per_stage},
               f"{last} centered": "float", "examples": "int"}
    names = sorted({t for tasks in per_stage.values() for t in tasks})
    rows = [[t, *[tasks.get(t, {}).get("accuracy") for tasks in per_stage.values()],
             per_stage[last].get(t, {}).get("centered"), per_stage[last].get(t, {}).get("examples")] for t in names]
    return table(columns, rows)


def compression_table(rows: Sequence[Mapping[str, Any]]) -> dg.TableMetadataValue:
    """The tokenizer's compression per data source (nanochat.tok_eval rows)."""
    return table({"source": "string", "docs": "int", "bytes": "int", "tokens": "int", "bytes/token": "float",
                  "tokens/doc": "float"}, [[r["source"], r["docs"], r["bytes"], r["tokens"], r["bytes_per_token"],
                                            r["tokens_per_doc"]] for r in rows])


def promoted(pointer: Mapping[str, Any]) -> dict[str, Any]:
    """The promoted model at a glance: one line naming it and its scores, then the scores as plottable numbers."""
    ck, scores = pointer["checkpoint"], pointer["scores"]
    summary = [f"**{pointer['profile']}** · {ck['stage']} {ck['model_tag']} · step {ck['step']}"]
    for name, label in (("core", "core_label"), ("chatcore", "chatcore_label"), ("val_bpb", None)):
        if scores.get(name) is not None:
            summary.append(f"{scores.get(label) or name} {as_text(scores[name])}")
    return {"promoted": dg.MetadataValue.md(" · ".join(summary)),
            **{k: scores.get(k) for k in ("core", "chatcore", "val_bpb")}}
