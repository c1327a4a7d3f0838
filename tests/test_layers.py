"""The map of the package: which layer every module of flashkv_edu is in and what it may import.

:data:`LAYERS` is the one table; the README's layer table is rendered from it (the test below
fails, printing the table to paste, when they differ). Every ``.py`` file of the package outside
``teach/`` is in exactly one layer; an import (at module level or inside a function) of another
module of the package must go to the module's own layer or to a layer it lists. No module outside
``teach/`` imports ``teach/``; ``teach/`` may import everything. The import graph has no cycle
(``test_torch_backend.py``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flashkv_edu"
README = PACKAGE.parent / "README.md"


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # paths relative to flashkv_edu/
    may_import: tuple[str, ...]  # other layers (its own layer is always allowed)
    what: str


LAYERS = (
    Layer(
        "rules",
        ("validation.py", "cli.py", "profiling.py", "testing.py"),
        (),
        "every argument rule and the error types; command-line argument types; allocation and timing "
        "probes; the tests' comparison helpers",
    ),
    Layer(
        "platform",
        ("runtime.py", "rotary.py", "masks.py"),
        ("rules",),
        "the device and Triton's interpreter (read once, here); rotary tables; the mask, ALiBi and "
        "GQA rules every attention shares",
    ),
    Layer(
        "oracle",
        ("reference.py",),
        ("rules", "platform"),
        "`attention_ref`, plain and obvious. Imported only by the layers that name it: the tiny model "
        "(its uncached path *is* the oracle, so cached decoding is checked against exact attention), "
        "the tools that measure error against exact attention, the front door, `teach/` and the tests; "
        "never by a backend, a kernel, the checked call or the API",
    ),
    Layer(
        "storage",
        ("cache.py", "blocks.py", "paged.py", "offload.py", "quant_codecs.py", "window_cache.py"),
        ("rules", "platform"),
        "caches and tiers: `KVCache` and `cache.write_rows`/`write_kv`, the one write path of keys, "
        "values and scales; block tables, host and disk tiers; quantized codes; the HF-style window cache",
    ),
    Layer(
        "algorithms",
        ("online_softmax.py", "split.py"),
        ("rules", "platform"),
        "streaming softmax and `merge_states` (notebook 04); FlashAttention's `num_splits` rule and the "
        "wave model (notebook 07)",
    ),
    Layer(
        "checked call",
        ("call.py", "call_fa3.py"),
        ("rules", "platform"),
        "`check_kvcache_call`: every argument of `flash_attn_with_kvcache` (FlashAttention 2's and 3's) "
        "checked once, the normalised `KVCacheCall` the backends take",
    ),
    Layer(
        "backends",
        (
            "torch_backend.py",
            "kernels/__init__.py",
            "kernels/common.py",
            "kernels/forward.py",
            "kernels/decode.py",
            "kernels/combine.py",
            "kernels/pitfalls.py",
        ),
        ("rules", "platform", "algorithms", "checked call"),
        "PyTorch's fused attention and the Triton kernels",
    ),
    Layer(
        "api",
        ("api.py", "fa3.py", "varlen.py", "quant.py"),
        ("rules", "platform", "storage", "algorithms", "checked call", "backends"),
        "`flash_attn_with_kvcache` (FlashAttention 2's front door) and `fa3` (FlashAttention 3's: "
        "`flash_attn_with_kvcache`, `get_scheduler_metadata`, `flash_attn_combine`); `QuantizedKVCache`",
    ),
    Layer(
        "model",
        ("model.py", "charlm.py"),
        ("rules", "platform", "oracle", "storage"),
        "the tiny decoder of notebook 02 and the trained character model",
    ),
    Layer(
        "serving",
        (
            "steps.py",
            "overlap.py",
            "loops.py",
            "chunked.py",
            "serving.py",
            "speculative.py",
            "cascade.py",
            "prefix.py",
            "memory.py",
            "hf/__init__.py",
            "hf/compat.py",
            "hf/attention.py",
            "hf/handoff.py",
            "hf/patches.py",
            "hf/register.py",
            "hf/layers.py",
            "hf/cache.py",
            "hf/serve.py",
        ),
        ("rules", "platform", "storage", "algorithms", "checked call", "backends", "api", "model"),
        "a step of the model over a paged cache (planned, then run; varlen); continuous batching, "
        "preemption, prefix reuse, overlap scheduling (a device thread, the write-after-read check) and "
        "chunked prefill; speculative decoding with rollback, cascade and tree attention; memory budgets; "
        "transformers' attention function and cache (`hf/`)",
    ),
    Layer(
        "long context",
        ("ring_cache.py", "quest.py", "mla.py", "flex.py"),
        ("rules", "platform", "storage", "algorithms", "checked call", "backends", "api", "model", "serving"),
        "notebook 13: attention sinks and a ring cache, a page-summary (Quest) cache, MLA's latent cache, "
        "the chain's masks in FlexAttention",
    ),
    Layer(
        "processes",
        ("workers.py", "transfer.py", "connector.py", "tensor_parallel.py", "disagg.py"),
        ("rules", "platform", "storage", "algorithms", "checked call", "backends", "api", "model", "serving"),
        "beyond one process (notebook 12): worker processes in one `torch.distributed` group, every wait "
        "bounded; a sequence's KV blocks moved with a header and per-layer SHA-256; a connector in "
        "vLLM's roles and call order; tensor-parallel KV heads; disaggregated prefill and decode",
    ),
    Layer(
        "tools",
        (
            "bench.py",
            "offload_bench.py",
            "process_bench.py",
            "spec_bench.py",
            "gpu_bench.py",
            "quant_eval.py",
            "sim.py",
            "kernels/gpucheck.py",
        ),
        (
            "rules",
            "platform",
            "oracle",
            "storage",
            "algorithms",
            "checked call",
            "backends",
            "api",
            "model",
            "serving",
            "long context",
            "processes",
        ),
        "benchmarks, notebook 09's error experiments, the serving-memory simulation, the GPU compile check",
    ),
    Layer(
        "front door",
        ("__init__.py",),
        ("platform", "oracle", "api"),
        "`import flashkv_edu as fk`: the API, the oracle and the runtime",
    ),
)


def layer_of() -> dict[str, Layer]:
    return {m: layer for layer in LAYERS for m in layer.modules}


def package_files() -> list[str]:
    return sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "teach"
    )


def module_file(dotted: str) -> str | None:
    """``flashkv_edu.kernels.decode`` -> ``kernels/decode.py`` (or a package's ``__init__.py``)."""
    parts = dotted.split(".")[1:]
    for candidate in (Path(*parts).with_suffix(".py") if parts else None, Path(*parts, "__init__.py")):
        if candidate is not None and (PACKAGE / candidate).exists():
            return str(candidate)
    return None


def imports_of(rel: str) -> set[str]:
    """The package files one file imports (anywhere in it), as paths relative to flashkv_edu/.
    ``from X import y`` counts ``X.y`` when ``y`` is a module, else ``X``."""
    path = PACKAGE / rel
    parts = ["flashkv_edu", *Path(rel).with_suffix("").parts]
    package = parts[:-1]  # the package a relative import starts from (for __init__.py: its own)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [module_file(a.name) for a in node.names if a.name.split(".")[0] == "flashkv_edu"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "flashkv_edu":
                continue
            subs = [module_file(f"{base}.{a.name}") for a in node.names]
            subs = [s for s in subs if s is not None and s != module_file(base)]
            targets = subs if subs else [module_file(base)]
        found.update(t for t in targets if t is not None and t != rel)
    return found


def render_table() -> str:
    rows = ["| layer | modules | may import | what |", "|---|---|---|---|"]
    for layer in LAYERS:
        modules = ", ".join(f"`{m}`" for m in layer.modules)
        allowed = ", ".join(layer.may_import) if layer.may_import else "nothing of the package"
        rows.append(f"| {layer.name} | {modules} | {allowed} | {layer.what} |")
    return "\n".join(rows)


def test_every_module_is_in_exactly_one_layer():
    listed = [m for layer in LAYERS for m in layer.modules]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == package_files(), (
        f"not in the table: {sorted(set(package_files()) - set(listed))}; "
        f"in the table but not in the package: {sorted(set(listed) - set(package_files()))}"
    )
    names = [layer.name for layer in LAYERS]
    for i, layer in enumerate(LAYERS):
        assert set(layer.may_import) <= set(names[:i]), f"layer {layer.name!r} may import only layers listed above it"


def test_every_import_is_one_the_table_allows():
    where = layer_of()
    bad = []
    for rel in package_files():
        layer = where[rel]
        for target in sorted(imports_of(rel)):
            other = where[target]
            if other is not layer and other.name not in layer.may_import:
                bad.append(f"{rel} ({layer.name}) imports {target} ({other.name})")
    assert not bad, "imports the layer table forbids:\n" + "\n".join(bad)


def test_no_core_module_imports_teach():
    bad = []
    for rel in package_files():
        text = (PACKAGE / rel).read_text()
        if re.search(r"^\s*(from\s+(flashkv_edu|\.+)\.?teach\b|import\s+flashkv_edu\.teach\b)", text, re.M):
            bad.append(rel)
        if re.search(r"^\s*from\s+\.+\s+import\s+.*\bteach\b", text, re.M):
            bad.append(rel)
    assert not bad, f"core modules importing teach/: {bad}"


def test_the_oracle_is_imported_only_where_the_table_says():
    users = {rel for rel in package_files() if "reference.py" in imports_of(rel)}
    allowed = {m for layer in LAYERS if "oracle" in layer.may_import for m in layer.modules}
    assert users <= allowed, users - allowed
    for rel in ("call.py", "api.py", "torch_backend.py", "kernels/forward.py", "kernels/decode.py"):
        assert "reference.py" not in imports_of(rel)


def test_the_import_reader_sees_imports_inside_functions():
    assert "masks.py" in imports_of("kernels/forward.py")  # tile_schedule imports it inside the function
    assert "split.py" in imports_of("kernels/decode.py")


def test_the_readme_holds_the_layer_table():
    text = README.read_text()
    table = render_table()
    assert table in text, "README's layer table differs from tests/test_layers.py's LAYERS; paste:\n\n" + table


def _from_imports(tree: ast.AST, package: list[str]) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from flashkv_edu.module import name`` in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "flashkv_edu":
                out += [(base, a.name) for a in node.names if a.name != "*"]
    return out


def _notebook_trees():
    import json

    for path in sorted((PACKAGE.parent / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "code" and not "".join(c["source"]).startswith("%")
        )
        yield (
            path.name,
            ast.parse("\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))),
        )


def test_every_core_module_states_all_and_what_others_import_is_in_it():
    """A name another module, a test or a notebook imports from a core module is public: it is
    in that module's ``__all__`` (or it is a submodule)."""
    import importlib

    for rel in package_files():
        tree = ast.parse((PACKAGE / rel).read_text())
        assert any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets) for n in tree.body
        ), f"{rel} states no __all__"
    sources = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        sources.append((str(rel), ast.parse(path.read_text()), ["flashkv_edu", *rel.with_suffix("").parts][:-1]))
    for path in sorted((PACKAGE.parent / "tests").rglob("*.py")):
        sources.append((f"tests/{path.name}", ast.parse(path.read_text()), []))
    sources += [(name, tree, []) for name, tree in _notebook_trees()]
    missing = set()
    for where, tree, package in sources:
        for module, name in _from_imports(tree, package):
            target = module_file(module)
            if target is None or target.startswith("teach") or module_file(f"{module}.{name}") not in (None, target):
                continue  # teach/ (not core), or a submodule
            exported = getattr(importlib.import_module(module), "__all__", ())
            if name not in exported:
                missing.add(f"{where}: {module}.{name}")
    assert not missing, "imported but not in __all__:\n" + "\n".join(sorted(missing))


def test_small_files_and_functions():
    """No file of the package over 600 lines, no function over 120 (Triton kernels aside: a kernel
    reads top-down as one program)."""
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        text = path.read_text()
        if text.count("\n") > 600:
            long_files.append((rel, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 120:
                if not any("jit" in ast.unparse(d) for d in node.decorator_list):
                    long_functions.append((rel, node.name, node.end_lineno - node.lineno + 1))
    assert not long_files and not long_functions, (long_files, long_functions)
