"""``python -m flashkv_edu.teach solutions DIR`` writes solved, executed copies of the notebooks;
``python -m flashkv_edu.teach list`` prints the exercise table."""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
from pathlib import Path

from ..cli import dir_to_create, existing_dir
from . import NOTEBOOKS, all_exercises, module_for

ROOT = Path(__file__).resolve().parents[2]


def exercise_table() -> str:
    """The README's table: per notebook, exercises, Triton ones, bug hunts, estimated minutes."""
    rows = ["| notebook | exercises | Triton | bug hunts | minutes |", "|---|---|---|---|---|"]
    for stem in NOTEBOOKS:
        ex = module_for(stem).EXERCISES
        rows.append(
            f"| {stem} | {len(ex)} | {sum(e.triton for e in ex)} | {sum(e.bug_hunt for e in ex)} | "
            f"{sum(e.minutes for e in ex)} |"
        )
    ex = all_exercises()
    rows.append(
        f"| **all** | **{len(ex)}** | **{sum(e.triton for e in ex)}** | **{sum(e.bug_hunt for e in ex)}** | "
        f"**{sum(e.minutes for e in ex)}** |"
    )
    return "\n".join(rows)


def defined_name(source: str) -> str | None:
    """The first function a cell defines."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            return node.name
    return None


def solution_source(module, name: str) -> str:
    """The source of the teaching module's solution ``name`` (a function or a Triton kernel). A
    solution may be the package's own function (``my_finish_split = finish_split``): its source is
    shown under the exercise's name."""
    obj = getattr(module, name)
    fn = getattr(obj, "fn", obj)  # a @triton.jit function keeps the Python one in .fn
    source = textwrap.dedent(inspect.getsource(fn)).rstrip() + "\n"
    if fn.__name__ != name:
        source = source.replace(f"def {fn.__name__}(", f"def {name}(", 1)
    return source


def solved_cell(source: str, module, name: str) -> str:
    """An exercise cell with its function replaced by the solution; what stands before the
    function (the imports it needs) is kept."""
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    head = "\n".join(source.splitlines()[: first - 1]).strip()
    return (head + "\n\n\n" if head else "") + solution_source(module, name)


def wait_in_slices(channel, slice_s: float = 1.0) -> None:
    """Make ``channel.get_msg(timeout)`` (an async jupyter_client channel) wait in ``slice_s``
    slices, looking again after each, up to the same ``timeout``.

    A cell that shows a widget now and then has its execute reply sit unnoticed on the shell
    socket (the socket's wake-up is lost; nbclient#312): one wait for the whole cell timeout
    returns the reply only when that timeout ends (measured here: the notebook 04 run took 129 s
    instead of 8, its widget cell exactly the 120 s timeout). Looking again every second finds it."""
    get = channel.get_msg

    async def get_msg(timeout=None):
        from queue import Empty
        from time import monotonic

        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = slice_s if deadline is None else max(0.0, min(slice_s, deadline - monotonic()))
            try:
                return await get(timeout=left)
            except Empty:
                if deadline is not None and monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def notebook_client(nb, path: Path, timeout: int = 600):
    """An nbclient ``NotebookClient`` running ``nb`` in a fresh python3 kernel in folder ``path``,
    ``timeout`` seconds per cell, its shell replies waited for in slices (:func:`wait_in_slices`)."""
    from nbclient import NotebookClient

    class SlicedWaitClient(NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            wait_in_slices(kc.shell_channel)
            return kc

    return SlicedWaitClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path)}})


def solve(notebook: Path, out: Path, execute: bool = True) -> int:
    """Copy ``notebook`` to ``out`` with every ``exercise`` cell replaced by its solution, then
    run it in a fresh kernel. Returns the number of cells replaced."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    module = module_for(notebook.name)
    replaced = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and "exercise" in cell.metadata.get("tags", []):
            name = defined_name(cell.source)
            if name is None or not hasattr(module, name):
                raise SystemExit(f"{notebook.name}: no solution for the exercise cell defining {name!r}")
            cell.source = solved_cell(cell.source, module, name)
            replaced += 1
    if execute:
        notebook_client(nb, notebook.parent).execute()
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return replaced


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashkv_edu.teach", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    sol = sub.add_parser("solutions", help="write solved, executed copies of the notebooks to DIR")
    sol.add_argument("dir", type=dir_to_create)
    sol.add_argument("--notebooks", type=existing_dir, default=ROOT / "notebooks")
    sol.add_argument("--no-execute", action="store_true", help="replace the exercise cells only")
    sol.add_argument(
        "--only", action="append", choices=list(NOTEBOOKS), metavar="NOTEBOOK", help="only this notebook (repeatable)"
    )
    sub.add_parser("list", help="print the exercise table")
    args = parser.parse_args(argv)
    if args.what == "list":
        print(exercise_table())
        return 0
    chosen = args.only or list(NOTEBOOKS)
    missing = [f"{stem}.ipynb" for stem in chosen if not (args.notebooks / f"{stem}.ipynb").is_file()]
    if missing:
        parser.error(f"--notebooks {str(args.notebooks)!r} lacks {', '.join(missing)}")
    for stem in chosen:
        src = args.notebooks / f"{stem}.ipynb"
        n = solve(src, args.dir / src.name, execute=not args.no_execute)
        print(f"{src.name}: {n} exercises solved -> {args.dir / src.name}", flush=True)
    images = args.notebooks / "images"
    if images.is_dir():  # notebooks may link pictures next to them
        import shutil

        shutil.copytree(images, args.dir / "images", dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
