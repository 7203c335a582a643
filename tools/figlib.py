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
    """A benchmark's recorded ``environment`` in a few words: ``cpu`` (benchmarks.common.environment_info) or,
    in the compression benchmarks' older shape, ``cpu_info`` with the core count in ``cpus``."""
    env = env or {}
    cpu = env.get("cpu") or ({**env["cpu_info"], "cores": env.get("cpus", "?")} if env.get("cpu_info") else {})
    if not cpu:
        return "machine not recorded"
    flags = [f for f in cpu.get("flags", []) if f in ("avx512_bf16", "amx_bf16")]
    return (f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores"
            f"{', ' + '/'.join(flags) if flags else ', no native bf16'}")


def source(files: list[str], version: str | None, env: dict | None, machine: str | None = None) -> str:
    """The line under a table: its files, the model version, and the machine (``machine``, else ``env``'s)."""
    what = ", ".join(f"`{f}`" for f in files)
    return (f"Source: {what}; model {f'**{version}**' if version else 'trained by the benchmark itself'}; "
            f"{machine or describe_machine(env)}.")


def runs_source(path: str, d: dict, keep) -> str:
    """The source line of a table of benchmark runs (``d["runs"]``, each recording its own environment) whose
    arms ``keep`` accepts, naming every machine they were measured on: the minutes of runs on different CPUs
    are not comparable."""
    machines: dict[str, list[str]] = {}
    for r in d["runs"].values():
        if keep(r["arm"]):
            machines.setdefault(describe_machine(r.get("environment")), []).append(f"{r['arm']}|{r['seed']}")
    if len(machines) == 1:
        return source([path], None, None, machine=next(iter(machines)))
    return source([path], None, None, machine="runs on **different machines**: " + "; ".join(
        f"{m}: {', '.join(sorted(runs))}" for m, runs in machines.items()))


def mean_std(s: dict, key: str, bold: bool = False) -> str:
    v = s[key]
    text = f"{v['mean']:.3f}" + (f" +- {v['std']:.3f}" if v["n"] > 1 else "")
    return f"**{text}**" if bold else text
