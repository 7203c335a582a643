"""What every README table renderer shares (tools/figures.py and the modules it draws tables from):
reading a result JSON, a markdown table, the source line naming the file, model version and machine."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(rel: str) -> dict:
    return json.loads((ROOT / rel).read_text())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def describe_machine(env: dict | None) -> str:
    cpu = (env or {}).get("cpu") or {}
    if not cpu:
        return "machine not recorded"
    flags = [f for f in cpu.get("flags", []) if f in ("avx512_bf16", "amx_bf16")]
    return (f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores"
            f"{', ' + '/'.join(flags) if flags else ', no native bf16'}")


def source(files: list[str], version: str | None, env: dict | None) -> str:
    what = ", ".join(f"`{f}`" for f in files)
    return f"Source: {what}; model {f'**{version}**' if version else 'trained by the benchmark itself'}; {describe_machine(env)}."


def mean_std(s: dict, key: str, bold: bool = False) -> str:
    v = s[key]
    text = f"{v['mean']:.3f}" + (f" +- {v['std']:.3f}" if v["n"] > 1 else "")
    return f"**{text}**" if bold else text
