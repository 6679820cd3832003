"""Helpers shared by the bench report writers (replica_report.py, volume_report.py)."""

import json


def load(path):
    """Loads one JSON document, skipping any text fio printed before it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON object")
    return json.loads(text[start:])


def num(x, fmt="{:,.0f}"):
    return "n/a" if x is None else fmt.format(x)


def ratio(a, b):
    return None if not a or not b else a / b
