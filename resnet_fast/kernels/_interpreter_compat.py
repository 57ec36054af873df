"""Two fixes to the Triton interpreter (the CPU path), applied when :mod:`resnet_fast.kernels` is imported.

1. :func:`apply` keeps the interpreter of triton <= 3.6 (the GPU machine's version) working with NumPy >= 2.4.
That interpreter turns a scalar tensor into a Python int with ``int(self.handle.data)``, and scalars are
1-element 1-D arrays there; NumPy 2.4 made ``int()`` of a 1-D array a TypeError, so every kernel whose loop
bound is a runtime value (all of ours) fails in the interpreter. Triton 3.9 converts ``data.squeeze()``; this
installs the same conversion on the old interpreter, and does nothing on one that already has it. It only
touches the interpreter (the CPU test path: the distributed and CPU-demo tests run it even on a GPU machine).

2. :func:`skip_discarded_overflow_checks`: the interpreter's ``sanitize_overflow`` option makes every int32
add/sub/mul also compute the result in int64 and compare it with the int32 range, then hand the comparison to
``device_assert``, which does nothing unless the ``debug`` option is set, and the interpreter's is never set.
That discarded work was about half of all interpreted time in this project's kernels; it is switched off
where ``debug`` is off, so nothing that could fail is lost.
"""
from __future__ import annotations

import dataclasses
import inspect

_OLD = "int(self.handle.data))"


def apply(interp=None) -> bool:
    """Patch ``interp`` (default ``triton.runtime.interpreter``) if it has the old conversion; True if patched
    now. Idempotent."""
    if interp is None:
        try:
            from triton.runtime import interpreter as interp
        except ImportError:
            return False
    target = getattr(interp, "_patch_lang_tensor", None)
    if target is None or getattr(target, "_resnet_fast_compat", False):
        return False
    try:
        if _OLD not in inspect.getsource(target):
            return False
    except (OSError, TypeError):
        return False

    def patch_lang_tensor(tensor, scope):
        target(tensor, scope)
        # set after the original, so the scope restores both in reverse order
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._resnet_fast_compat = True
    interp._patch_lang_tensor = patch_lang_tensor
    return True


def skip_discarded_overflow_checks(interp=None) -> bool:
    """Turn off ``sanitize_overflow`` on ``interp``'s builder (default ``triton.runtime.interpreter``) where its
    ``debug`` option is off (the overflow asserts would be dropped anyway); True if changed now. Idempotent;
    a no-op on an interpreter without these options."""
    if interp is None:
        try:
            from triton.runtime import interpreter as interp
        except ImportError:
            return False
    builder = getattr(interp, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or getattr(options, "debug", True):
        return False
    if not getattr(options, "sanitize_overflow", False):
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True
