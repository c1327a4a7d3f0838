#!/usr/bin/env python3
"""Maintainers' notebook tool (not needed by learners).

    python .ci/nbtool.py export notebooks/01_x.ipynb > /tmp/01_x.py   # notebook -> percent text
    python .ci/nbtool.py build /tmp/01_x.py notebooks/01_x.ipynb       # percent text -> notebook
    python .ci/nbtool.py execute notebooks/01_x.ipynb [...]            # fresh kernel, outputs stored

Percent text: cells start with ``# %%`` (code) or ``# %% [markdown]``; tags go after the marker
as ``tags=["nbval-ignore-output"]``. Markdown lines are stored with a leading ``# ``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat

MARK = re.compile(r"^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")


def build(src: Path, out: Path) -> None:
    cells, current = [], None
    for line in src.read_text().splitlines():
        m = MARK.match(line)
        if m:
            current = {"md": bool(m.group("md")), "tags": json.loads(m.group("tags") or "[]"), "lines": []}
            cells.append(current)
        elif current is not None:
            if current["md"]:
                line = line[2:] if line.startswith("# ") else line.lstrip("#")
            current["lines"].append(line)
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for c in cells:
        text = "\n".join(c["lines"]).strip("\n")
        cell = nbformat.v4.new_markdown_cell(text) if c["md"] else nbformat.v4.new_code_cell(text)
        cell.metadata = {"tags": c["tags"]} if c["tags"] else {}
        nb.cells.append(cell)
    out.write_text(nbformat.writes(nb) + "\n")


def export(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        tag_text = f" tags={json.dumps(tags)}" if tags else ""
        if cell.cell_type == "markdown":
            body = "\n".join(("# " + ln) if ln else "#" for ln in cell.source.splitlines())
            parts.append(f"# %% [markdown]{tag_text}\n{body}")
        else:
            parts.append(f"# %%{tag_text}\n{cell.source}")
    return "\n\n".join(parts) + "\n"


def execute(nb_path: Path) -> float:
    from flashkv_edu.teach.__main__ import notebook_client  # waits for replies in slices (nbclient#312)

    nb = nbformat.read(nb_path, as_version=4)
    start = time.perf_counter()
    notebook_client(nb, nb_path.parent).execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb_path.write_text(nbformat.writes(nb) + "\n")
    return elapsed


def main(argv: list[str]) -> None:
    cmd, *args = argv
    if cmd == "build":
        build(Path(args[0]), Path(args[1]))
    elif cmd == "export":
        sys.stdout.write(export(Path(args[0])))
    elif cmd == "execute":
        for name in args:
            print(f"{name}: executed in {execute(Path(name)):.1f} s", flush=True)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
