"""resnet_fast.kernels._interpreter_compat: the old interpreter's scalar conversion is replaced, a new one is
left alone, and the replacement converts what NumPy >= 2.4 refuses to."""
import types

import numpy as np

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
