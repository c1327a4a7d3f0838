"""Show the lines of the package that a notebook teaches, straight from the source."""

from __future__ import annotations

import inspect
from pathlib import Path


def package_lines(obj, first: str, last: str) -> str:
    """The source of ``obj`` (a function, class or Triton ``JITFunction``) from the first line
    containing ``first`` through the next line containing ``last``, printed under the file's
    name and returned so the notebook can assert on it (no line numbers: they would change the
    notebook's output with every edit elsewhere in the file).
    Raises ``LookupError`` when either marker is missing: the notebook's text would be stale."""
    fn = inspect.unwrap(getattr(obj, "fn", obj))  # a Triton JITFunction or a decorator wraps the function
    lines, _ = inspect.getsourcelines(fn)
    try:
        i = next(n for n, line in enumerate(lines) if first in line)
        j = next(n for n in range(i, len(lines)) if last in lines[n])
    except StopIteration:
        raise LookupError(f"{fn.__qualname__} no longer has the lines {first!r} .. {last!r}") from None
    chosen = lines[i : j + 1]
    indent = min(len(line) - len(line.lstrip()) for line in chosen if line.strip())
    path = Path(inspect.getsourcefile(fn))
    parts = path.parts
    top = len(parts) - 1 - parts[::-1].index("flashkv_edu") if "flashkv_edu" in parts else len(parts) - 1
    shown = Path(*parts[top:])
    text = "".join(line[indent:] for line in chosen)
    print(f"# from {fn.__qualname__} in {shown.as_posix()}\n{text.rstrip()}")
    return text
