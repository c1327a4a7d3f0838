"""Every command line of the package answers a bad argument with a usage line naming the
option and exit status 2, and writes no file."""

from __future__ import annotations

import contextlib
import io

import pytest
from contract import same, snapshot

# --- command lines -----------------------------------------------------------------------------------

CLI_CASES = [
    ("flashkv_edu.bench", ["decode", "--steps", "0"], "--steps"),
    ("flashkv_edu.bench", ["decode", "--steps", "-3"], "--steps"),
    ("flashkv_edu.bench", ["decode", "--steps", "two"], "--steps"),
    ("flashkv_edu.bench", ["decode", "--contexts", "0"], "--contexts"),
    ("flashkv_edu.bench", ["decode", "--contexts", "100000000"], "--contexts"),
    ("flashkv_edu.bench", ["decode", "--contexts", "4000", "--steps", "200"], "--contexts + --steps"),
    ("flashkv_edu.bench", ["nothing"], "invalid choice"),
    ("flashkv_edu.bench", ["gpu", "--out", "{tmp}/missing/results.json"], "--out"),
    ("flashkv_edu.bench", ["gpu", "--out", "{tmp}"], "--out"),
    ("flashkv_edu.sim", ["--rate", "0"], "--rate"),
    ("flashkv_edu.sim", ["--rate", "nan"], "--rate"),
    ("flashkv_edu.sim", ["--seed", "-1"], "--seed"),
    ("flashkv_edu.charlm", ["train", "--minutes", "-1"], "--minutes"),
    ("flashkv_edu.charlm", ["train", "--minutes", "inf"], "--minutes"),
    ("flashkv_edu.charlm", ["fly"], "invalid choice"),
    ("flashkv_edu.kernels.gpucheck", ["--workers", "0"], "--workers"),
    ("flashkv_edu.kernels.gpucheck", ["--json", "{tmp}/missing/table.json"], "--json"),
    ("flashkv_edu.kernels.gpucheck", ["--excerpt", "no_such_kernel"], "--excerpt"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/afile/solved"], "dir"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/solved", "--notebooks", "{tmp}/missing"], "--notebooks"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/solved", "--notebooks", "{tmp}/empty"], "lacks"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/solved", "--only", "99_no_such_notebook"], "--only"),
    ("flashkv_edu.teach", ["nothing"], "invalid choice"),
    ("flashkv_edu.bench", ["transfer", "--fast"], "unrecognized"),
    ("flashkv_edu.disagg", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("flashkv_edu.disagg", ["--prefill-workers", "0"], "--prefill-workers"),
    ("flashkv_edu.disagg", ["--decode-workers", "nine"], "--decode-workers"),
    ("flashkv_edu.disagg", ["--tensor-parallel", "3"], "--tensor-parallel"),
    ("flashkv_edu.disagg", ["--fault", "meteor"], "--fault"),
    ("flashkv_edu.disagg", ["--timeout", "0"], "--timeout"),
    ("flashkv_edu.disagg", ["--timeout", "nan"], "--timeout"),
    ("flashkv_edu.disagg", ["--json", "{tmp}"], "--json"),
    ("flashkv_edu.disagg", ["--json", "{tmp}/missing/out.json"], "--json"),
    ("flashkv_edu.disagg", ["--store", "{tmp}/afile"], "--store"),
    ("flashkv_edu.disagg", ["--prompt", ""], "--prompt"),
    ("flashkv_edu.disagg", ["--prompt", "x" * 1020, "--max-new-tokens", "8"], "--max-new-tokens"),
]


def _main(module: str):
    import importlib

    if module == "flashkv_edu.teach":
        return importlib.import_module("flashkv_edu.teach.__main__").main
    return importlib.import_module(module).main


@pytest.mark.parametrize(
    "module, argv, named", CLI_CASES, ids=[" ".join([m.split(".")[-1], *a]) for m, a, _ in CLI_CASES]
)
def test_a_bad_command_line_is_a_usage_error(tmp_path, module, argv, named):
    """Exit status 2, a usage line naming the option, and the working directory untouched."""
    (tmp_path / "afile").write_text("a file, not a directory\n")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        _main(module)(argv)
    assert info.value.code == 2, err.getvalue()
    assert "usage:" in err.getvalue() and named in err.getvalue(), err.getvalue()
    assert same(before, snapshot(tmp_path)), "a refused command line wrote a file"
