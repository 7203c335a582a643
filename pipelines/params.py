"""params.yaml: the one source of truth for every knob, with `key.path=value` overrides."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-3`` and ``2e-4`` as strings, DVC writes them so."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ParamsError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Params(dict):
    """A dict of params with ``p.get_path("train.epochs")`` that names a missing key clearly, and
    ``p.config``: the same values typed, section by section (:mod:`components.config`)."""

    source: str = "params.yaml"
    _config = None

    @property
    def config(self):
        """The validated sections (built once; a missing, unknown or mistyped key fails here)."""
        if self._config is None:
            from components.config import load_config

            self._config = load_config(self, self.source)
        return self._config

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
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {'.'.join(parts[:i + 1])} is {node!r}, not a mapping")
    node[parts[-1]] = value


def check_known(tree: dict, dotted: str, source: str) -> None:
    """An override names a key the params file has (``-S train.epoch=3`` is a typo, not a new knob).

    New keys may go where the file leaves a mapping open: an empty mapping (``ray.env: {}``, an empty
    file) or a variant's ``kwargs``."""
    import difflib

    node, parts = tree, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or not node or (i and parts[i - 1] == "kwargs"):
            return  # a scalar replaced by a mapping (set_path says so), or an open mapping
        if part not in node:
            where = ".".join(parts[:i]) or "the top level"
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
            hint = f"; did you mean `{'.'.join([*parts[:i], close[0]])}`?" if close else ""
            raise ParamsError(f"{source} has no `{dotted}` (no `{part}` under {where}){hint}")
        node = node[part]


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml and apply ``key.path=value`` overrides (values parsed as YAML); an override of a
    key the file does not have fails (:func:`check_known`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run resops from the project root or pass --params")
    tree = parse_yaml(path.read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key.path=value")
        key, value = item.split("=", 1)
        check_known(tree, key.strip(), str(path))
        set_path(tree, key.strip(), parse_yaml(value))
    params = Params(copy.deepcopy(tree))
    params.source = str(path)
    return params
