"""orchestration/metadata.py: numbers a person reads, and read back exactly as they are shown."""

from __future__ import annotations

import base64
import io
import math
import re

import dagster as dg
import pytest
from PIL import Image

from orchestration import metadata as md


@pytest.mark.parametrize("value, text", [
    (0.123456, "0.1235"), (2.71828, "2.718"), (1234.56, "1235"), (12345.6, "12350"), (4.5e12, "4.5e+12"),
    (0.000123456, "0.0001235"), (0.0, "0"), (-2.34567, "-2.346"), (12, "12"), (123456789, "123456789"),
    (math.nan, "nan"), (math.inf, "inf"),
])
def test_numbers_as_text_have_4_significant_digits_and_read_back(value, text):
    assert md.as_text(value) == text
    back = md.parse(text)
    if isinstance(value, int):  # counts stay whole
        assert back == value
    else:
        assert math.isnan(back) if math.isnan(value) else back == float(f"{value:.4g}")


def test_only_headline_numbers_are_plottable():
    values = md.entries({"val_bpb": 1.234567, "core": 0.1, "step": 12, "final_loss": 3.14159, "none": None,
                         "config": {"lr": 0.0123456, "depth": 4}, "uri": "file:///x"})
    assert values["val_bpb"] == dg.MetadataValue.float(1.235) and isinstance(values["core"], dg.FloatMetadataValue)
    assert values["step"] == dg.MetadataValue.text("12") and values["final_loss"] == dg.MetadataValue.text("3.142")
    assert values["config"] == dg.MetadataValue.json({"lr": 0.01235, "depth": 4}) and "none" not in values
    assert md.number({"x": "3.142"}, "x") == 3.142 and md.number({"x": "n/a"}, "x") is None
    assert md.number({"x": "12"}, "x") == 12 and isinstance(md.number({"x": "12"}, "x"), int)


def test_training_metadata_plots_the_curves_and_leaves_mfu_to_gpus():
    result = {"loss_curve": [[1, 6.0], [2, 5.0], [3, 4.5]], "val_bpb": 2.5, "tok_per_sec": 1234.5678, "mfu": 0.0,
              "samples": ["The capital of France is *Paris*"]}
    messages = [{"step": 2, "val_bpb": 2.7}, {"step": 3, "loss": 4.5}, {"step": 3, "val_bpb": 2.5}]
    cpu = md.training(result, messages, "cpu")
    assert "mfu" not in cpu and md.training(result, messages, "cuda")["mfu"] == 0.0
    assert cpu["steps_trained"] == 3 and cpu["loss_trend"] == "6 █▃▁ 4.5"
    found = re.fullmatch(r"!\[loss\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", cpu["loss_curve"].value)
    png = Image.open(io.BytesIO(base64.b64decode(found.group(1))))
    assert png.format == "PNG" and png.size == (648, 216)  # two panels: train loss, val bpb
    assert len(base64.b64decode(found.group(1))) < 60_000
    assert cpu["samples"].value == "**1.** The capital of France is \\*Paris\\*"
    assert md.training({"loss_curve": []}, [], "cpu")["loss_curve"] == "no steps"


def test_sparkline_shows_the_whole_curve_in_a_line():
    assert md.sparkline([6.2, 5.9, 5.5, 5.2, 5.0, 5.09]) == "6.2 █▆▄▂▁▂ 5.09"
    long = md.sparkline([float(x) for x in range(100, 0, -1)])
    assert long.startswith("100 █") and long.endswith("▁ 1") and len(long.split()[1]) <= 34
    assert md.sparkline([3.0, math.nan, 2.0]) == "3 █×▁ 2"  # a NaN step is shown, not hidden


def test_score_tables_have_a_schema_and_print_as_markdown():
    tasks = {"arc_easy": {"accuracy": 0.123456, "centered": -0.0123456, "random_baseline": 25.0, "examples": 4}}
    table = md.core_table(tasks)
    assert [(c.name, c.type) for c in table.schema.columns] == [
        ("task", "string"), ("accuracy", "float"), ("centered", "float"), ("random baseline %", "float"),
        ("examples", "int")]
    assert table.records[0].data == {"task": "arc_easy", "accuracy": 0.1235, "centered": -0.01235,
                                     "random baseline %": 25.0, "examples": 4}
    assert md.table_md(table).splitlines()[-1] == "| arc_easy | 0.1235 | -0.01235 | 25 | 4 |"
    chat = md.chat_table({"mid": {"chat_tasks": {"GSM8K": {"accuracy": 0.5, "centered": 0.5, "examples": 2}}},
                          "sft": {"chat_tasks": {"GSM8K": {"accuracy": 1.0, "centered": 1.0, "examples": 2},
                                                 "MMLU": {"accuracy": 0.25, "centered": 0.0, "examples": 2}}}})
    assert [r.data for r in chat.records] == [
        {"task": "GSM8K", "mid accuracy": 0.5, "sft accuracy": 1.0, "sft centered": 1.0, "examples": 2},
        {"task": "MMLU", "mid accuracy": None, "sft accuracy": 0.25, "sft centered": 0.0, "examples": 2}]


def test_chat_samples_read_as_questions_and_answers():
    text = md.samples_md([["What is 2+2?", "4 <script>"]]).value
    assert text == "**1. Q:** What is 2\\+2?  \n**A:** 4 \\<script\\>"
