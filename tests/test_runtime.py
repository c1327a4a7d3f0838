"""The runtime switch: device, interpreter, canary, notebook setup."""

import os
import subprocess
import sys

import pytest
import torch

import flashkv_edu
from flashkv_edu import runtime


def test_device_and_interpreter_follow_the_machine():
    assert runtime.DEVICE.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert runtime.INTERPRET
    assert "device=" in runtime.describe()


def test_canary_kernel_runs():
    assert runtime.run_canary()


def test_setup_notebook_prints_one_stable_line(capsys):
    flashkv_edu.setup_notebook(seed=3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("environment ready: device=")


def test_explicit_interpret_off_is_respected():
    code = "import flashkv_edu.runtime as r; print(r.INTERPRET)"
    env = {"TRITON_INTERPRET": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_importing_triton_first_on_cpu_warns_and_keeps_the_pytorch_paths():
    """transformers imports Triton; flashkv_edu imported after it still works on PyTorch, warns,
    and backend="triton" raises the hint instead of failing obscurely."""
    if torch.cuda.is_available():
        pytest.skip("only CPU-only machines need the interpreter")  # pragma: no cover
    code = (
        "import triton.language, torch, flashkv_edu as fk\n"
        "q = torch.randn(1, 1, 2, 16); k = torch.randn(1, 4, 2, 16)\n"
        "out = fk.flash_attn_with_kvcache(q, k, k, cache_seqlens=4)\n"
        "print(bool((out - fk.attention_ref(q, k, k)).abs().max() < 1e-6))\n"
        "try:\n    fk.flash_attn_with_kvcache(q, k, k, cache_seqlens=4, backend='triton')\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("True") and "Import flashkv_edu first" in run.stdout
    assert "Import flashkv_edu first" in run.stderr  # the warning


# --- who decides where code runs ---------------------------------------------------------------


def test_auto_is_pytorch_on_a_cpu_and_triton_on_a_gpu():
    assert runtime.resolve_backend("auto", "cpu") == "torch"
    expected = "triton" if (runtime.HAS_TRITON and not runtime.INTERPRET) else "torch"
    assert runtime.resolve_backend("auto", "cuda") == expected
    assert runtime.resolve_backend("torch", "cpu") == "torch"


def _runtime_report(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(env_extra)
    code = "import flashkv_edu.runtime as r; print(r.INTERPRET, r.HAS_CUDA, r.run_canary())"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


@pytest.mark.skipif(runtime.HAS_CUDA, reason="what a CPU-only machine decides")
def test_runtime_alone_decides_on_a_cpu():
    """Without a GPU the interpreter is on whatever CUDA_VISIBLE_DEVICES says, and the canary
    really runs; in a compile-only process (TRITON_INTERPRET=0) it says it did not run."""
    assert _runtime_report({}) == ["True", "False", "True"]
    assert _runtime_report({"CUDA_VISIBLE_DEVICES": "-1"}) == ["True", "False", "True"]
    assert _runtime_report({"CUDA_VISIBLE_DEVICES": "0"}) == ["True", "False", "True"]
    assert _runtime_report({"TRITON_INTERPRET": "0"}) == ["False", "False", "False"]


def test_a_triton_older_than_the_kernels_need_leaves_the_pytorch_paths(tmp_path):
    """A PyTorch build may pin an older Triton (Colab's GPU image: 3.6). flashkv_edu keeps it,
    turns its kernels off, says why, and every PyTorch path works."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.6.0'\ndef jit(fn=None, **kw):\n    return fn\n")
    (fake / "language.py").write_text("class constexpr:\n    pass\n")
    script = (
        "import torch, flashkv_edu as fk\n"
        "from flashkv_edu import runtime\n"
        "assert not runtime.HAS_TRITON and runtime.TRITON_VERSION == '3.6.0'\n"
        "print(runtime.describe())\n"
        "q = torch.randn(1, 1, 2, 16); kc = torch.randn(1, 8, 1, 16)\n"
        "lens = torch.tensor([8], dtype=torch.int32)\n"
        "out = fk.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens)\n"
        "assert torch.allclose(out, fk.attention_ref(q, kc, kc, seqlens_k=lens), atol=1e-5)\n"
        "try:\n"
        "    fk.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens, backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Triton 3.6.0 too old for the kernels (PyTorch paths only)" in run.stdout
    assert "older than 3.7" in run.stdout and "every PyTorch part works" in run.stdout
