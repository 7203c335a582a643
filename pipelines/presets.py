"""Presets: named sets of params overrides (``presets/<name>.yaml``, dotted keys), run as DVC experiments.

    python -m pipelines.presets quality        # prints the `-S key=value` arguments of the preset
    make quality                               # dvc exp run with them
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PRESETS = Path(__file__).resolve().parent.parent / "presets"


def load_preset(name_or_path: str | Path) -> dict:
    """A preset as ``{dotted key: value}``; ``name_or_path``: ``quality`` or a path to a YAML file."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise FileNotFoundError(f"no preset {name_or_path!r} ({path}); known: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and "." in k or k == "seed" for k in data):
        raise ValueError(f"{path}: a preset maps dotted params keys (e.g. train.epochs) to values")
    return data


def _flow(value) -> str:
    """A value as a YAML flow scalar with no whitespace (it is word-split by `make quality`'s shell)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if any(c.isspace() for c in text):
        raise ValueError(f"preset value {value!r} contains whitespace")
    return text


def set_arguments(preset: dict) -> list[str]:
    """``-S key=value`` pairs for ``dvc exp run`` / ``resops`` (DVC and resops parse values as YAML)."""
    return [a for k, v in preset.items() for a in ("-S", f"{k}={_flow(v)}")]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.presets NAME", file=sys.stderr)
        return 2
    print(" ".join(set_arguments(load_preset(args[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
