"""The data version of a prepared dataset: the ``data_digest`` of its report, which run names
(:func:`components.train.naming.run_name`) and therefore resuming depend on."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pandas as pd


def manifest_digest(manifest: pd.DataFrame, columns: Sequence[str] = ("sha256", "split")) -> str:
    """sha256 over the manifest's rows in order, each row the concatenation of ``columns``
    (image sha256 and split; a detection manifest adds its ``boxes`` JSON)."""
    joined = manifest[columns[0]]
    for column in columns[1:]:
        joined = joined + manifest[column]
    return hashlib.sha256("".join(joined).encode()).hexdigest()
