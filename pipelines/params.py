"""params.yaml: the one source of truth for every knob, with `key.path=value` overrides."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


class ParamsError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Params(dict):
    """A dict of params with ``p.get_path("train.epochs")`` that names a missing key clearly."""

    source: str = "params.yaml"

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{self.source} has no `{dotted}`: add it (see the README's parameter list)")
            node = node[part]
        return node

    def __call__(self, dotted: str) -> Any:
        return self.get_path(dotted)


def set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml and apply ``key.path=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run resops from the project root or pass --params")
    tree = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key.path=value")
        key, value = item.split("=", 1)
        set_path(tree, key.strip(), yaml.safe_load(value))
    params = Params(copy.deepcopy(tree))
    params.source = str(path)
    return params
