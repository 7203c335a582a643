"""README tables are what their JSON renders (tools/figures.py): a number edited by hand in README.md,
or a JSON re-measured without re-rendering the README, fails here."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tools.figures import README, RENDERERS, render_readme

ROOT = Path(__file__).resolve().parents[1]


def test_every_readme_table_is_what_its_json_renders():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "figures.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_renderer_has_its_block_in_the_readme():
    text = README.read_text()
    for name in RENDERERS:
        assert f"<!-- figures:{name} -->" in text and f"<!-- /figures:{name} -->" in text, name


def test_an_edited_number_is_caught(tmp_path):
    text = README.read_text()
    block = re.search(r"<!-- figures:default-pipeline -->\n(.*?)<!-- /figures:default-pipeline -->", text, re.S)
    number = re.search(r"\*\*(0\.\d{3})\*\*", block[1])[1]  # the full model's accuracy
    edited = text.replace(block[1], block[1].replace(f"**{number}**", f"**{float(number) + 0.1:.3f}**", 1))
    assert edited != text
    copy = tmp_path / "README.md"
    copy.write_text(edited)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "figures.py"), "--check", "--readme", str(copy)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "'default-pipeline' differs" in proc.stdout, proc.stdout
    fixed, changed, unknown = render_readme(edited)
    assert changed == ["default-pipeline"] and not unknown and fixed == text


# Tables that describe (options, stages, files) rather than report measurements: the only ones that may
# stand outside a figures block. A new table of measured figures must be rendered from its JSON.
DESCRIPTIVE_TABLES = {
    "| option | key | what it does |",
    "| stage | what it does | outs |",
    "| name | what changes | added parameters |",
    "| `data.dataset` | what | `data.task` |",
    "| deployment | model | placement (Ray custom resource) | batching |",
    "| stage | function | library it calls |",
}


def test_every_table_of_figures_is_rendered_from_json():
    outside, inside = [], False
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("<!-- figures:"):
            inside = True
        elif line.startswith("<!-- /figures:"):
            inside = False
        elif not inside and line.startswith("|---") and lines[i - 1] not in DESCRIPTIVE_TABLES:
            outside.append(f"line {i}: {lines[i - 1]}")
    assert not outside, "tables outside a figures block (render them in tools/figures.py):\n" + "\n".join(outside)
