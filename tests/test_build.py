"""Build configuration and the extension loader (resnet_fast._build_config, resnet_fast._ext, setup.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from resnet_fast import _build_config as cfg
from resnet_fast import _ext
from resnet_fast.ops import bn_add_relu

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RESNET_FAST_BACKEND": "auto", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)


def test_build_config_loads_by_path_without_the_package():
    # What setup.py does: the package (and torch) must not be imported by loading the config.
    r = run_python(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("cfg", {str(ROOT / "resnet_fast/_build_config.py")!r})
        cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
        assert "resnet_fast" not in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
        print(cfg.sources(cuda=True))
    """)
    assert r.returncode == 0, r.stderr
    assert "csrc/bn_add_relu.cpp" in r.stdout and "csrc/bn_add_relu_cuda.cu" in r.stdout


def test_sources_exist_and_cover_csrc():
    for s in cfg.sources(cuda=True) + cfg.HEADERS:
        assert (ROOT / s).is_file(), s
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*") if p.suffix in (".cpp", ".cu")}
    assert on_disk == set(cfg.sources(cuda=True))


def test_cuda_flags():
    flags = cfg.nvcc_flags()
    assert "-O3" in flags
    for arch in ("80", "90"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert sum(f.startswith("-std=") for f in flags) == 1


def test_want_cuda(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CUDA", "0")
    assert cfg.want_cuda() is False
    monkeypatch.delenv("RESNET_FAST_CUDA")
    assert cfg.want_cuda() == (torch.version.cuda is not None and cfg.nvcc_path() is not None)
    if torch.version.cuda is None:
        monkeypatch.setenv("RESNET_FAST_CUDA", "1")
        with pytest.raises(RuntimeError, match="RESNET_FAST_CUDA=1 but torch was built without CUDA"):
            cfg.want_cuda()


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as if nothing were loaded yet in this process (state restored afterwards)."""
    monkeypatch.setattr(_ext, "_attempted", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "ops_registered", lambda: False)
    monkeypatch.setenv("RESNET_FAST_FORCE_JIT", "1")  # pretend resnet_fast._C is not built
    monkeypatch.delenv("RESNET_FAST_NO_JIT", raising=False)
    monkeypatch.setenv("RESNET_FAST_BACKEND", "auto")
    return monkeypatch


def _call_op():
    x = torch.randn(1, 2, 2, 2)
    bn_add_relu(x, torch.ones(2), torch.zeros(2), x)


def test_missing_compiler_is_named(fresh_loader):
    fresh_loader.setenv("CXX", "no-such-c++-compiler")
    assert _ext.load() is False
    assert "a C++ compiler ('no-such-c++-compiler' is not on PATH" in _ext.error()
    with pytest.raises(RuntimeError, match=r"needs the resnet_fast C\+\+ extension.*a C\+\+ compiler"):
        _call_op()


def test_missing_ninja_is_named(fresh_loader):
    from torch.utils import cpp_extension

    fresh_loader.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert _ext.load() is False
    with pytest.raises(RuntimeError, match=r"missing ninja \(pip install ninja\)"):
        _ext.require()


def test_build_failure_is_reported(fresh_loader):
    from torch.utils import cpp_extension

    def broken(**_):
        raise RuntimeError("Error building extension 'resnet_fast_C': csrc/bn_add_relu.cpp:1: error: boom")

    fresh_loader.setattr(cpp_extension, "load", broken)
    fresh_loader.setenv("TORCH_EXTENSIONS_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "rf_never_built"))
    assert _ext.load() is False
    with pytest.raises(RuntimeError, match=r"JIT build failed: Error building extension.*boom"):
        _call_op()


def test_no_jit_flag(fresh_loader):
    fresh_loader.setenv("RESNET_FAST_NO_JIT", "1")
    assert _ext.load() is False
    with pytest.raises(RuntimeError, match="JIT build disabled by RESNET_FAST_NO_JIT=1"):
        _ext.require()


def test_build_directory_respects_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = _ext.build_directory()
    assert d.parent.parent == tmp_path and d.name == cfg.JIT_NAME


def test_package_imports_without_extension():
    """No prebuilt module, JIT disabled: import works, calling the op names the problem."""
    r = run_python("""
        import torch, resnet_fast
        from resnet_fast.ops import bn_add_relu
        x = torch.randn(1, 2, 2, 2)
        try:
            bn_add_relu(x, torch.ones(2), torch.zeros(2), x)
        except RuntimeError as e:
            print("ERR", e)
    """, RESNET_FAST_FORCE_JIT="1", RESNET_FAST_NO_JIT="1")
    assert r.returncode == 0, r.stderr
    assert "ERR resnet_fast.ops.bn_add_relu needs the resnet_fast C++ extension" in r.stdout
    assert "RESNET_FAST_NO_JIT=1" in r.stdout


_FRAGMENT_OP = """
    @torch.library.custom_op("resnet_fast::probe_{tag}", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1
"""
_CHECK = """
    x = torch.randn(1, 2, 2, 2)
    y = torch.ops.resnet_fast.bn_add_relu(x, torch.ones(2), torch.zeros(2), x)
    assert torch.equal(y, torch.relu(2 * x))
    assert torch.equal(torch.ops.resnet_fast.probe_{tag}(x), x + 1)
    print("OK")
"""


@pytest.mark.parametrize("order", ["fragment_first", "extension_first"])
def test_torch_library_coexists_with_python_fragments(order):
    """C++ TORCH_LIBRARY(resnet_fast) and Python custom_op("resnet_fast::...") fragments, either order."""
    frag, check = _FRAGMENT_OP.format(tag=order), _CHECK.format(tag=order)
    imp = "\n    import resnet_fast\n    assert resnet_fast._ext.available(), resnet_fast._ext.error()\n"
    body = frag + imp if order == "fragment_first" else imp + frag
    r = run_python("import torch\n" + textwrap.dedent(body) + textwrap.dedent(check))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


@pytest.mark.slow
def test_jit_build_into_cache_dir_once(tmp_path):
    """The real JIT path: builds into TORCH_EXTENSIONS_DIR and says so; a second import reuses the build."""
    code = """
        import logging, torch
        logging.basicConfig(level=logging.INFO)
        import resnet_fast
        from resnet_fast import _ext
        assert _ext.available(), _ext.error()
        assert type(_ext._module).__name__ == "module" and _ext._module.__name__ == "resnet_fast_C"
        x = torch.randn(2, 3, 4, 4)
        y = resnet_fast.ops.bn_add_relu(x, torch.ones(3), torch.zeros(3), x)
        assert torch.equal(y, torch.relu(2 * x))
    """
    env = dict(TORCH_EXTENSIONS_DIR=str(tmp_path), RESNET_FAST_FORCE_JIT="1")
    first = run_python(code, **env)
    assert first.returncode == 0, first.stderr
    assert "JIT-compiling csrc/" in first.stderr and str(tmp_path) in first.stderr
    assert list(tmp_path.glob(f"*/{cfg.JIT_NAME}/{cfg.JIT_NAME}*.so"))
    second = run_python(code, **env)
    assert second.returncode == 0, second.stderr
    assert "JIT-compiling" not in second.stderr and "loading the JIT-built C++ extension" in second.stderr
