"""resnet_fast.kernels._interpreter_compat: the old interpreter's scalar conversion is replaced, a new one is
left alone, and the replacement converts what NumPy >= 2.4 refuses to."""
import dataclasses
import types

import numpy as np
import torch

from resnet_fast.kernels import _interpreter_compat as compat


class _Scope:
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)


def _module(body: str):
    src = f"def _patch_lang_tensor(tensor, scope):\n    scope.set_attr(tensor, '__index__', lambda self: {body})\n"
    mod = types.ModuleType("fake_interpreter")
    code = compile(src, "<fake_interpreter>", "exec")
    exec(code, mod.__dict__)
    # inspect.getsource needs a file: give the function its source through linecache
    import linecache
    linecache.cache["<fake_interpreter>"] = (len(src), None, src.splitlines(True), "<fake_interpreter>")
    return mod


def test_old_interpreter_is_patched_once_and_converts_1d_scalars():
    mod = _module("int(self.handle.data)")
    assert compat.apply(mod) is True
    assert compat.apply(mod) is False  # idempotent

    class Tensor:
        handle = types.SimpleNamespace(data=np.array([7]))

    scope = _Scope()
    mod._patch_lang_tensor(Tensor, scope)
    assert Tensor().__index__() == 7 and range(Tensor())[-1] == 6
    assert [name for _, name, _ in scope.changes] == ["__index__", "__index__"]  # restorable in reverse order


def test_fixed_interpreter_is_left_alone():
    mod = _module("int(self.handle.data.squeeze())")
    before = mod._patch_lang_tensor
    assert compat.apply(mod) is False and mod._patch_lang_tensor is before


def _builder_module(**options):
    mod = types.ModuleType("fake_interpreter")
    mod.interpreter_builder = types.SimpleNamespace(options=_Options(**options))
    return mod


@dataclasses.dataclass(frozen=True)
class _Options:
    debug: bool = False
    sanitize_overflow: bool = True


def test_overflow_checks_are_skipped_only_where_their_asserts_would_be_dropped():
    off = _builder_module()
    assert compat.skip_discarded_overflow_checks(off) is True
    assert off.interpreter_builder.options == _Options(debug=False, sanitize_overflow=False)
    assert compat.skip_discarded_overflow_checks(off) is False  # idempotent
    debug = _builder_module(debug=True)
    assert compat.skip_discarded_overflow_checks(debug) is False
    assert debug.interpreter_builder.options.sanitize_overflow is True  # with debug the asserts fire: kept
    assert compat.skip_discarded_overflow_checks(types.ModuleType("no_builder")) is False


def test_the_installed_interpreter_runs_without_the_discarded_checks(monkeypatch):
    """After importing resnet_fast.kernels the real interpreter skips them, and int32 arithmetic still wraps as
    compiled code's does (the check never changed a result: it only fed a dropped assert)."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow

    def square(p):
        v = tl.load(p)
        tl.store(p, v * v)

    t = torch.tensor([70000], dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is decorated: interpreted even on a GPU
    triton.jit(square)[(1,)](t)
    assert int(t) == (70000 * 70000 + 2**31) % 2**32 - 2**31
