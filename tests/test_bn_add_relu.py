"""bn_add_relu and its residual-free form bn_relu (csrc/ kernels through resnet_fast.ops.bn_add_relu) against a
float64 reference.

Most tests are parametrized over the residual mode ``res``: "none" (bn_relu: the kernels with kHasRes = false),
"plain" (bn_add_relu with a residual) and "bn" (bn_add_relu with the residual's own affine). The "centres" section
covers the optional x_centre / res_centre arguments (the backward's Σg·(x - centre) sums).
Errors are relative norms ||out - ref|| / ||ref|| with per-dtype tolerances. CPU tests run the C++ kernels;
the same tests run on CUDA where there is a GPU (``gpu`` marker), plus CUDA-only cases (misaligned pointers,
a tensor over 2^31 bytes).
"""
import sys

import pytest
import torch

import resnet_fast
from resnet_fast import _ext
from resnet_fast.ops import bn_add_relu, bn_relu
from helpers import rel_err

MOD = sys.modules["resnet_fast.ops.bn_add_relu"]  # the module (resnet_fast.ops.bn_add_relu is the function)

OP = torch.ops.resnet_fast.bn_add_relu if _ext.available() else None
OP_NO_RES = torch.ops.resnet_fast.bn_relu if _ext.available() else None
RES = ["none", "plain", "bn"]
OP_NAME = {"none": "bn_relu", "plain": "bn_add_relu", "bn": "bn_add_relu"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Tolerances on relative error norms: outputs and input gradients are rounded to the dtype once; the
# per-channel sums are accumulated in float32 (float64) whatever the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
SUM_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# HW = 30 (not a multiple of the vector width) with C % 8 == 0, and an odd C with HW % 8 == 0.
SHAPES = [(2, 8, 5, 6), (3, 5, 4, 4)]


def make_inputs(shape, dtype, layout, res_bn, device="cpu", seed=0):
    """(x, scale, shift, residual, res_scale, res_shift); res_bn may be a residual mode of RES ("none": the
    residual is None; x, scale, shift are the same as for the other modes)."""
    res = res_bn if isinstance(res_bn, str) else ("bn" if res_bn else "plain")
    res_bn = res == "bn"
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    fmt = LAYOUTS[layout]
    x = torch.randn(shape, generator=g).to(dtype).to(device).contiguous(memory_format=fmt)
    r = torch.randn(shape, generator=g).to(dtype).to(device).contiguous(memory_format=fmt)
    s = (torch.rand(c, generator=g) + 0.5).to(pdt).to(device)
    b = torch.randn(c, generator=g).to(pdt).to(device)
    rs = (torch.rand(c, generator=g) + 0.5).to(pdt).to(device) if res_bn else None
    rb = torch.randn(c, generator=g).to(pdt).to(device) if res_bn else None
    return x, s, b, (None if res == "none" else r), rs, rb


def reference(x, s, b, r, rs, rb, relu):
    """Float64 reference expression (no residual term when r is None); leaves are float64 copies that
    autograd differentiates."""
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    z = x.double() * v(s) + v(b)
    if r is not None:
        z = z + (r.double() * v(rs) + v(rb) if rs is not None else r.double())
    return torch.relu(z) if relu else z


def tail(x, s, b, r=None, rs=None, rb=None, relu=True, raw=False, xc=None, rc=None):
    """bn_relu when r is None, else bn_add_relu; raw: the torch.ops op instead of the Python wrapper.
    xc, rc: the centres (x_centre, res_centre), passed only when given."""
    if r is None:
        if raw:
            return OP_NO_RES(x, s, b, relu, *(() if xc is None else (xc,)))
        return bn_relu(x, s, b, relu, **({} if xc is None else {"x_centre": xc}))
    if raw:
        return OP(x, s, b, r, rs, rb, relu, *(() if xc is None and rc is None else (xc, rc)))
    return bn_add_relu(x, s, b, r, rs, rb, relu, x_centre=xc, res_centre=rc)


def tail_backward(go, x, s, b, r=None, rs=None, rb=None, relu=True, xc=None, rc=None):
    """The raw backward op's outputs by name: grad_x, sum_g, sum_gx (+ grad_residual, sum_gr with a residual).
    xc, rc: the centres, passed only when given (so the calls without them use the original schema)."""
    if r is None:
        return dict(zip(("grad_x", "sum_g", "sum_gx"), torch.ops.resnet_fast.bn_relu_backward(
            go, x, s, b, relu, *(() if xc is None else (xc,)))))
    return dict(zip(("grad_x", "grad_residual", "sum_g", "sum_gx", "sum_gr"),
                    torch.ops.resnet_fast.bn_add_relu_backward(
                        go, x, s, b, r, rs, rb, relu, *(() if xc is None and rc is None else (xc, rc)))))


def present(*tensors):
    return tuple(t for t in tensors if t is not None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("res", RES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_vs_float64(dtype, layout, res, relu, shape, device):
    x, s, b, r, rs, rb = make_inputs(shape, dtype, layout, res, device)
    names = [n for n, t in zip(("x", "scale", "shift", "residual", "res_scale", "res_shift"), (x, s, b, r, rs, rb))
             if t is not None]
    leaves = {n: t.detach().clone().requires_grad_() for n, t in zip(names, present(x, s, b, r, rs, rb))}
    out = tail(*(leaves.get(n) for n in ("x", "scale", "shift", "residual", "res_scale", "res_shift")), relu=relu)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=LAYOUTS[layout])

    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref = reference(*(ref_leaves.get(n) for n in ("x", "scale", "shift", "residual", "res_scale", "res_shift")),
                    relu)
    assert rel_err(out, ref) <= TOL[dtype]

    go = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    grads = torch.autograd.grad(out, list(leaves.values()), go)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), go.double())
    for name, gk, gr in zip(names, grads, ref_grads):
        tol = TOL[dtype] if name in ("x", "residual") else SUM_TOL[dtype]
        assert gk.dtype == leaves[name].dtype, name
        assert rel_err(gk, gr) <= tol, f"grad {name}: {rel_err(gk, gr):.3g} > {tol}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_op_sums(layout, res, device):
    """The raw backward op: sum_gr = Σ g·residual even without res_scale; mask recomputed from the inputs;
    bn_relu_backward returns exactly (grad_x, sum_g, sum_gx)."""
    x, s, b, r, _, _ = make_inputs((4, 16, 32, 32), torch.float32, layout, res, device)  # several chunks
    go = torch.randn_like(x)
    out = tail_backward(go, x, s, b, r, None, None, True)
    z = reference(x, s, b, r, None, None, relu=False)
    g = go.double() * (z > 0)
    assert rel_err(out["grad_x"], g * s.double().view(1, -1, 1, 1)) <= 1e-6
    assert out["grad_x"].is_contiguous(memory_format=LAYOUTS[layout]) and out["grad_x"].dtype == x.dtype
    assert rel_err(out["sum_g"], g.sum((0, 2, 3))) <= 1e-5
    assert rel_err(out["sum_gx"], (g * x.double()).sum((0, 2, 3))) <= 1e-5
    for name in ("sum_g", "sum_gx"):
        assert out[name].shape == (16,) and out[name].dtype == s.dtype
    if r is not None:
        assert rel_err(out["grad_residual"], g) <= 1e-6
        assert out["grad_residual"].is_contiguous(memory_format=LAYOUTS[layout])
        assert rel_err(out["sum_gr"], (g * r.double()).sum((0, 2, 3))) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bn_relu_is_bn_add_relu_with_zero_residual(layout, relu, dtype, device):
    """bn_relu runs the same kernels without the residual: the same bits as bn_add_relu with a zero residual
    (adding +0 is exact), forward and backward (same reduction partition and order)."""
    x, s, b, _, _, _ = make_inputs((4, 16, 12, 12), dtype, layout, "none", device)
    zero = torch.zeros_like(x)
    assert torch.equal(OP_NO_RES(x, s, b, relu), OP(x, s, b, zero, None, None, relu))
    go = torch.randn_like(x)
    mine = tail_backward(go, x, s, b, relu=relu)
    full = tail_backward(go, x, s, b, zero, relu=relu)
    for name in ("grad_x", "sum_g", "sum_gx"):
        assert torch.equal(mine[name], full[name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "bn"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_deterministic(layout, res, device):
    x, s, b, r, rs, rb = make_inputs((4, 16, 24, 24), torch.float32, layout, res, device)
    go = torch.randn_like(x)
    first = tail_backward(go, x, s, b, r, rs, rb, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the CPU partition depends on the shape only, not on the thread count
        second = tail_backward(go, x, s, b, r, rs, rb, True)
    finally:
        torch.set_num_threads(threads)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("res", RES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64(layout, res, relu):
    x, s, b, r, rs, rb = make_inputs((2, 3, 3, 4), torch.float64, layout, res, seed=3)
    ins = [t.requires_grad_() for t in present(x, s, b, r, rs, rb)]
    z = reference(x, s, b, r, rs, rb, relu=False)
    assert z.abs().min() > 1e-4  # keep the ReLU kink away from the finite-difference steps

    def f(*t):
        if res == "none":
            return bn_relu(*t, relu=relu)
        return bn_add_relu(*t[:4], *(t[4:] if res == "bn" else (None, None)), relu=relu)

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "bn"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_empty_batch(layout, res, device):
    x, s, b, r, rs, rb = make_inputs((0, 4, 3, 3), torch.float32, layout, res, device)
    x.requires_grad_()
    s.requires_grad_()
    b.requires_grad_()
    out = tail(x, s, b, r, rs, rb)
    assert out.shape == (0, 4, 3, 3) and out.is_contiguous(memory_format=LAYOUTS[layout])
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(s.grad, torch.zeros(4, device=device))
    assert torch.equal(b.grad, torch.zeros(4, device=device))
    if r is None:
        raw = tail_backward(torch.zeros_like(x), x.detach(), s.detach(), b.detach())
        assert raw["grad_x"].shape == x.shape
        assert torch.equal(raw["sum_g"], torch.zeros(4, device=device)) and torch.equal(raw["sum_gx"], raw["sum_g"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "bn"])
def test_expanded_grad_out_and_sum(res, device):
    """out.sum().backward() hands the op an expanded (stride-0) gradient: densified, then the kernel."""
    x, s, b, r, rs, rb = make_inputs((2, 8, 4, 4), torch.float32, "nhwc", res, device)
    x.requires_grad_()
    tail(x, s, b, r, rs, rb).sum().backward()
    z = reference(x.detach(), s, b, r, rs, rb, relu=False)
    assert rel_err(x.grad, (z > 0).double() * s.double().view(1, -1, 1, 1)) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_misaligned_pointers(layout, res, device):
    """A storage offset of one element defeats 16-byte alignment: the scalar path must give the same result
    as the vector path (the aligned call on the same values)."""
    shape = (2, 16, 4, 4)
    fmt = LAYOUTS[layout]

    def misaligned(t):  # same values, one element past an aligned allocation
        buf = torch.empty(t.numel() + 1, device=device)[1:]
        return buf.as_strided(t.shape, t.contiguous(memory_format=fmt).stride()).copy_(t)

    x, s, b, r, _, _ = make_inputs(shape, torch.float32, layout, res, device)
    go = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    xm, rm, gom = misaligned(x), (None if r is None else misaligned(r)), misaligned(go)
    assert xm.data_ptr() % 16 != 0 and xm.is_contiguous(memory_format=fmt)
    out = tail(xm, s, b, rm)
    assert rel_err(out, reference(x, s, b, r, None, None, True)) <= 1e-6
    assert torch.equal(out, tail(x, s, b, r))
    mis = tail_backward(gom, xm, s, b, rm, None, None, True)
    ali = tail_backward(go, x, s, b, r, None, None, True)
    g = go.double() * (reference(x, s, b, r, None, None, False) > 0)
    assert rel_err(mis["grad_x"], g * s.double().view(1, -1, 1, 1)) <= 1e-6
    assert rel_err(mis["sum_gx"], (g * x.double()).sum((0, 2, 3))) <= 1e-5
    for name in mis:
        assert rel_err(mis[name], ali[name]) <= 1e-6, name


@pytest.mark.parametrize("res", ["none", "bn"])
def test_eager_backend_matches_kernel(res, eager_backend):
    x, s, b, r, rs, rb = make_inputs((2, 8, 3, 3), torch.float32, "nchw", res)
    eager = tail(x, s, b, r, rs, rb)
    assert resnet_fast.stats()["kernel_calls"].get(OP_NAME[res], 0) == 0
    assert rel_err(eager, tail(x, s, b, r, rs, rb, raw=True)) <= 1e-6


@pytest.mark.parametrize("res", ["none", "plain"])
def test_kernel_call_counted(res, triton_backend):
    x, s, b, r, _, _ = make_inputs((1, 4, 2, 2), torch.float32, "nchw", res)
    tail(x, s, b, r)
    assert resnet_fast.stats()["kernel_calls"] == {OP_NAME[res]: 1}


# ---------------------------------------------------------------------------------------------------- errors

def _good(shape=(2, 4, 3, 3)):
    return make_inputs(shape, torch.float32, "nchw", True)


_BAD = [  # (case, message, applies to bn_relu too)
    ("x_int", r"x must be float32, float16, bfloat16 or float64", True),
    ("x_3d", r"x must be a 4-D", True),
    ("residual_dtype", r"residual has dtype", False),
    ("residual_shape", r"residual has shape", False),
    ("scale_len", r"scale must have shape \[C\] = \[4\]", True),
    ("scale_dtype", r"scale must be Float", True),
    ("shift_2d", r"shift must have shape \[C\]", True),
    ("res_shift_missing", r"res_scale and res_shift must be given together", False),
    ("x_strided", r"x must be dense NCHW-contiguous or channels_last", True),
    ("residual_layout", r"residual must be dense in the same memory format as x", False),
]


@pytest.mark.parametrize("via", ["wrapper", "op"])
@pytest.mark.parametrize("res,case,match", [(res, case, match) for res in ("none", "bn") for case, match, both in _BAD
                                            if res == "bn" or both])
def test_bad_inputs(res, case, match, via):
    """ValueError naming the argument, prefixed with the op's name, from the C++ checks (via the wrapper or
    the raw op alike)."""
    x, s, b, r, rs, rb = _good()
    if case == "x_int":
        x = x.to(torch.int32)
    elif case == "x_3d":
        x, r = x[0], r[0]
    elif case == "residual_dtype":
        r = r.half()
    elif case == "residual_shape":
        r = r[:, :, :2]
    elif case == "scale_len":
        s = s[:3]
    elif case == "scale_dtype":
        s = s.half()
    elif case == "shift_2d":
        b = b.view(2, 2)
    elif case == "res_shift_missing":
        rb = None
    elif case == "x_strided":
        x = torch.randn(2, 4, 3, 6)[..., ::2]
    elif case == "residual_layout":
        r = r.contiguous(memory_format=torch.channels_last)
    if res == "none":
        r = rs = rb = None
    with pytest.raises(ValueError, match=f"^{OP_NAME[res]}: {match}"):
        tail(x, s, b, r, rs, rb, raw=via == "op")


@pytest.mark.parametrize("res", ["none", "bn"])
def test_bad_grad_out(res):
    x, s, b, r, rs, rb = _good()
    r, rs, rb = (None, None, None) if res == "none" else (r, rs, rb)
    name = OP_NAME[res] + "_backward"
    with pytest.raises(ValueError, match=rf"^{name}: grad_out has shape"):
        tail_backward(x[:1], x, s, b, r, rs, rb, True)
    with pytest.raises(ValueError, match=rf"^{name}: grad_out must be dense in the same memory format"):
        tail_backward(x.contiguous(memory_format=torch.channels_last), x, s, b, r, rs, rb, True)
    with pytest.raises(ValueError, match=rf"^{name}: grad_out has dtype"):
        tail_backward(x.double(), x, s, b, r, rs, rb, True)
    with pytest.raises(ValueError, match=rf"^{name}: scale must have shape \[C\] = \[4\]"):
        tail_backward(x, x, s[:2], b, r, rs, rb, True)


@pytest.mark.parametrize("res", ["none", "bn"])
def test_device_mismatch(res):
    x, s, b, r, rs, rb = _good()
    r, rs, rb = (None, None, None) if res == "none" else (r, rs, rb)
    with pytest.raises(ValueError, match=rf"^{OP_NAME[res]}: scale is on meta but x is on cpu"):
        tail(x, s.to("meta"), b, r, rs, rb)
    with pytest.raises(ValueError, match=rf"^{OP_NAME[res]}: shift must be a torch.Tensor"):
        tail(x, s, 1.0, r, rs, rb)


def test_residual_not_a_tensor():
    x, s, b, r, rs, rb = _good()
    with pytest.raises(ValueError, match=r"residual must be a torch.Tensor"):
        bn_add_relu(x, s, b, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("res", ["none", "bn"])
def test_device_mismatch_cuda(res):
    x, s, b, r, rs, rb = make_inputs((2, 4, 3, 3), torch.float32, "nchw", res, "cuda")
    with pytest.raises(ValueError, match=rf"^{OP_NAME[res]}: scale is on cpu but x is on cuda"):
        tail(x, s.cpu(), b, r, rs, rb, raw=True)  # the C++ check (the wrapper's would catch it first)


# ------------------------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("res", ["none", "bn"])
def test_torch_compile_fullgraph(res):
    x, s, b, r, rs, rb = make_inputs((2, 8, 4, 4), torch.float32, "nhwc", res)

    def f(x, s, b, r, rs, rb):
        return tail(x * 2, s, b, r, rs, rb).sum()

    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=backend)
    xs = [t.detach().clone().requires_grad_() for t in (x, s, b)]
    xe = [t.detach().clone().requires_grad_() for t in (x, s, b)]
    yc, ye = cf(*xs, r, rs, rb), f(*xe, r, rs, rb)
    assert rel_err(yc, ye) <= 1e-6
    yc.backward()
    ye.backward()
    for a, e in zip(xs, xe):
        assert rel_err(a.grad, e.grad) <= 1e-6
    want = getattr(torch.ops.resnet_fast, OP_NAME[res])  # dynamo records the OpOverloadPacket
    assert len(graphs) == 1 and any(n.target in (want, want.default) for n in graphs[0].graph.nodes), graphs


@pytest.mark.parametrize("res", RES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck(layout, res):
    x, s, b, r, rs, rb = make_inputs((2, 4, 3, 3), torch.float32, layout, res)
    for t in present(x, s, b, r, rs, rb):
        t.requires_grad_()
    go = torch.randn_like(x)
    det = [t.detach() if t is not None else None for t in (x, s, b, r, rs, rb)]
    if res == "none":
        torch.library.opcheck(torch.ops.resnet_fast.bn_relu.default, (x, s, b, True))
        torch.library.opcheck(torch.ops.resnet_fast.bn_relu_backward.default, (go, *det[:3], True))
    else:
        torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu.default, (x, s, b, r, rs, rb, True))
        torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu_backward.default, (go, *det, True))
    # With the centres (no gradient: they only set the rounding of the backward's sums).
    xc = det[0].mean((0, 2, 3))
    if res == "none":
        torch.library.opcheck(torch.ops.resnet_fast.bn_relu.default, (x, s, b, True, xc))
        torch.library.opcheck(torch.ops.resnet_fast.bn_relu_backward.default, (go, *det[:3], True, xc))
    else:
        rc = det[3].mean((0, 2, 3))
        torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu.default, (x, s, b, r, rs, rb, True, xc, rc))
        torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu_backward.default, (go, *det, True, xc, rc))
        torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu.default, (x, s, b, r, rs, rb, True, xc, None))


# ----------------------------------------------------------------------------------------------- centres

def _centres(x, r, seed=5):
    """Per-channel centres near the batch means of x and r (not exactly them: any centre must work)."""
    g = torch.Generator().manual_seed(seed)
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = (0, 2, 3)

    def near_mean(t):
        return (t.double().mean(dims).cpu() + 0.1 * torch.randn(t.shape[1], generator=g, dtype=torch.float64)).to(
            pdt).to(t.device)
    return near_mean(x), (None if r is None else near_mean(r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", RES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_op_centred_sums(layout, res, device):
    """(a) With centres the backward op returns sum_gx = Σg·(x - x_centre[c]) and sum_gr = Σg·(r - res_centre[c]);
    grad_x, grad_residual and sum_g are the same bits as without them, and a zero centre gives the uncentred
    sums bit for bit (x - 0 == x)."""
    x, s, b, r, rs, rb = make_inputs((4, 16, 32, 32), torch.float32, layout, res, device)  # several chunks
    xc, rc = _centres(x, r)
    go = torch.randn_like(x)
    out = tail_backward(go, x, s, b, r, rs, rb, True, xc=xc, rc=rc)
    plain = tail_backward(go, x, s, b, r, rs, rb, True)
    g = go.double() * (reference(x, s, b, r, rs, rb, relu=False) > 0)
    view = (1, -1, 1, 1)
    assert rel_err(out["sum_gx"], (g * (x.double() - xc.double().view(view))).sum((0, 2, 3))) <= 1e-5
    if r is not None:
        assert rel_err(out["sum_gr"], (g * (r.double() - rc.double().view(view))).sum((0, 2, 3))) <= 1e-5
    for name in ("grad_x", "grad_residual", "sum_g"):
        if name in out:
            assert torch.equal(out[name], plain[name]), name
    zero = tail_backward(go, x, s, b, r, rs, rb, True, xc=torch.zeros_like(xc),
                         rc=None if r is None else torch.zeros_like(rc))
    for name in out:
        assert torch.equal(zero[name], plain[name]), name
    if r is not None:  # one centre without the other: each sum takes its own
        only_x = tail_backward(go, x, s, b, r, rs, rb, True, xc=xc)
        assert torch.equal(only_x["sum_gx"], out["sum_gx"]) and torch.equal(only_x["sum_gr"], plain["sum_gr"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_centre_removes_cancellation(layout, res, device):
    """(b) The BatchNorm backward needs Σg·(x - mean). For channels with |mean| >> std (x = 1000 + N(0, 1), fp32)
    the uncentred route, Σg·x - mean·Σg, keeps the fp32 accumulation error of Σg·x (~eps·Σ|g·x|): 1.7e-4 to
    8e-4 relative on the CPU kernels here (NHWC sums longer runs sequentially), against 1.5e-7 to 4.4e-7 for the
    centred sum, which forms every product from the exact x - mean. The uncentred error is asserted too, so the
    test shows it can fail. (Autograd then rebuilds Σg·x = sum_gx + mean·sum_g in fp32, one rounding: ~2e-5
    here, eps·|mean|/std-sized, whatever the number of terms.)"""
    shape = (4, 16, 32, 32)
    fmt = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(7)
    x = (1000 + torch.randn(shape, generator=gen)).to(device).contiguous(memory_format=fmt)
    r = (-1000 + torch.randn(shape, generator=gen)).to(device).contiguous(memory_format=fmt)
    r = None if res == "none" else r
    s = (torch.rand(16, generator=gen) + 0.5).to(device)
    b = torch.randn(16, generator=gen).to(device)
    go = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
    mean = lambda t: t.double().mean((0, 2, 3)).float()  # noqa: E731  (the batch mean, in fp32 as in training)
    xc, rc = mean(x), (None if r is None else mean(r))
    centred = tail_backward(go, x, s, b, r, None, None, False, xc=xc, rc=rc)  # relu=False: g = grad_out
    plain = tail_backward(go, x, s, b, r, None, None, False)
    view = (1, -1, 1, 1)
    for name, t, c in (("sum_gx", x, xc), ("sum_gr", r, rc)):
        if t is None:
            continue
        want = (go.double() * (t.double() - c.double().view(view))).sum((0, 2, 3))
        err_centred = rel_err(centred[name], want)
        err_plain = rel_err(plain[name].double() - c.double() * plain["sum_g"].double(), want)
        assert err_centred <= 1e-5, f"{name}: centred {err_centred:.2e}"
        assert err_plain > 20 * err_centred, f"{name}: uncentred {err_plain:.2e}, centred {err_centred:.2e}"
        if device == "cpu":  # the CPU partition sums long runs sequentially: the uncentred route fails outright
            assert err_plain > 1e-4, f"{name}: uncentred {err_plain:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", RES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_centred_autograd_matches(dtype, layout, res, device):
    """(c) The centres change no value and, through autograd, no gradient beyond fp32 rounding: scale/shift/
    res_scale/res_shift gradients equal the uncentred ones and float64 autograd of the reference; the input
    gradients are the same bits."""
    x, s, b, r, rs, rb = make_inputs((2, 8, 5, 6), dtype, layout, res, device)
    xc, rc = _centres(x, r)
    names = ("x", "scale", "shift", "residual", "res_scale", "res_shift")
    present_names = [n for n, t in zip(names, (x, s, b, r, rs, rb)) if t is not None]
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)

    def grads(**centres):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in zip(present_names, present(x, s, b, r, rs, rb))}
        out = tail(*(leaves.get(n) for n in names), **centres)
        return out, dict(zip(present_names, torch.autograd.grad(out, list(leaves.values()), go)))

    out_c, centred = grads(xc=xc, rc=rc)
    out_p, plain = grads()
    assert torch.equal(out_c, out_p)
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in zip(present_names, present(x, s, b, r, rs, rb))}
    ref = reference(*(ref_leaves.get(n) for n in names), True)
    ref_grads = dict(zip(present_names, torch.autograd.grad(ref, list(ref_leaves.values()), go.double())))
    for name in present_names:
        if name in ("x", "residual"):
            assert torch.equal(centred[name], plain[name]), name
        else:
            assert rel_err(centred[name], plain[name]) <= SUM_TOL[dtype], f"{name} vs uncentred"
            assert rel_err(centred[name], ref_grads[name]) <= SUM_TOL[dtype], f"{name} vs float64"


@pytest.mark.parametrize("res", RES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64_with_centres(layout, res):
    x, s, b, r, rs, rb = make_inputs((2, 3, 3, 4), torch.float64, layout, res, seed=3)
    xc, rc = _centres(x, r)
    ins = [t.requires_grad_() for t in present(x, s, b, r, rs, rb)]

    def f(*t):
        if res == "none":
            return bn_relu(*t, x_centre=xc)
        return bn_add_relu(*t[:4], *(t[4:] if res == "bn" else (None, None)), x_centre=xc, res_centre=rc)

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


_BAD_CENTRES = [  # (case, message, applies to bn_relu too)
    ("x_centre_len", r"x_centre must have shape \[C\] = \[4\]", True),
    ("x_centre_dtype", r"x_centre must be Float", True),
    ("x_centre_strided", r"x_centre must be contiguous", True),
    ("x_centre_float32_for_float64", r"x_centre must be Double", True),
    ("res_centre_len", r"res_centre must have shape \[C\] = \[4\]", False),
    ("res_centre_dtype", r"res_centre must be Float", False),
]


@pytest.mark.parametrize("via", ["wrapper", "op", "backward"])
@pytest.mark.parametrize("res,case,match", [(res, case, match) for res in ("none", "bn")
                                            for case, match, both in _BAD_CENTRES if res == "bn" or both])
def test_bad_centres(res, case, match, via):
    """(d) Bad centres: ValueError naming the argument, from the C++ checks (forward and backward op)."""
    x, s, b, r, rs, rb = _good()
    xc, rc = torch.zeros(4), torch.zeros(4)
    if case == "x_centre_len":
        xc = xc[:3]
    elif case == "x_centre_dtype":
        xc = xc.half()
    elif case == "x_centre_strided":
        xc = torch.zeros(8)[::2]
    elif case == "x_centre_float32_for_float64":
        x, s, b, r, rs, rb = (t.double() for t in (x, s, b, r, rs, rb))
    elif case == "res_centre_len":
        rc = rc[:2]
    elif case == "res_centre_dtype":
        rc = rc.double()
    if res == "none":
        r = rs = rb = rc = None
    if via == "backward":
        with pytest.raises(ValueError, match=f"^{OP_NAME[res]}_backward: {match}"):
            tail_backward(x, x, s, b, r, rs, rb, True, xc=xc, rc=rc)
    else:
        with pytest.raises(ValueError, match=f"^{OP_NAME[res]}: {match}"):
            tail(x, s, b, r, rs, rb, raw=via == "op", xc=xc, rc=rc)


@pytest.mark.parametrize("res", ["none", "bn"])
def test_bad_centres_in_the_wrapper(res):
    x, s, b, r, rs, rb = _good()
    r, rs, rb = (None, None, None) if res == "none" else (r, rs, rb)
    with pytest.raises(ValueError, match=rf"^{OP_NAME[res]}: x_centre must be a torch.Tensor, got float"):
        tail(x, s, b, r, rs, rb, xc=1.0)
    with pytest.raises(ValueError, match=rf"^{OP_NAME[res]}: x_centre is on meta but x is on cpu"):
        tail(x, s, b, r, rs, rb, xc=torch.zeros(4, device="meta"))
    if res == "bn":
        with pytest.raises(ValueError, match=r"^bn_add_relu: res_centre is on meta but x is on cpu"):
            tail(x, s, b, r, rs, rb, rc=torch.zeros(4, device="meta"))


def test_centres_are_ignored_by_the_eager_backend(eager_backend):
    x, s, b, r, rs, rb = make_inputs((2, 8, 3, 3), torch.float32, "nchw", "bn")
    xc, rc = _centres(x, r)
    assert torch.equal(tail(x, s, b, r, rs, rb, xc=xc, rc=rc), tail(x, s, b, r, rs, rb))
    assert torch.equal(tail(x, s, b, xc=xc), tail(x, s, b))


def test_extension_without_centres(monkeypatch):
    """An extension built before x_centre/res_centre existed: calls without centres run as before (same
    argument count for the op and its backward); a call with one raises a RuntimeError asking for a rebuild."""
    assert MOD._has_centres("bn_add_relu") and MOD._has_centres("bn_relu")
    x, s, b, r, rs, rb = _good()
    xc = torch.zeros(4)
    monkeypatch.setattr(MOD, "_has_centres", lambda op="bn_add_relu": False)
    for rr in (r, None):
        with pytest.raises(RuntimeError, match=r"predates the x_centre/res_centre arguments.*rebuild it"):
            tail(x, s, b, rr, rs if rr is not None else None, rb if rr is not None else None, xc=xc)
        tail(x, s, b, rr, rs if rr is not None else None, rb if rr is not None else None)

    # The autograd formulas with the old schema's inputs (7 / 4 of them, no centres): as many gradients back.
    class Ctx:
        def save_for_backward(self, *t):
            self.saved_tensors = t

    go = torch.randn_like(x)
    ctx = Ctx()
    MOD._setup_context(ctx, (x, s, b, r, rs, rb, True), None)
    grads = MOD._backward(ctx, go)
    assert len(grads) == 7 and grads[-1] is None
    full = tail_backward(go, x, s, b, r, rs, rb, True)
    assert torch.equal(grads[0], full["grad_x"]) and torch.equal(grads[1], full["sum_gx"])
    ctx = Ctx()
    MOD._setup_context_no_res(ctx, (x, s, b, True), None)
    grads = MOD._backward_no_res(ctx, go)
    assert len(grads) == 4 and grads[-1] is None


# ---------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("res", ["none", "bn"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_matches_cpu_kernel(layout, res):
    """Vector path on CUDA (16-byte loads: C and HW multiples of 8 at fp16) against the CPU kernel."""
    x, s, b, r, rs, rb = make_inputs((4, 64, 14, 14), torch.float16, layout, res)
    go = torch.randn_like(x)
    cuda = [t.cuda() if t is not None else None for t in (go, x, s, b, r, rs, rb)]
    assert rel_err(tail(*cuda[1:], raw=True).cpu(), tail(x, s, b, r, rs, rb, raw=True)) <= 2e-3
    cpu = tail_backward(go, x, s, b, r, rs, rb, True)
    gpu = tail_backward(*cuda, True)
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert rel_err(gpu[name].cpu(), cpu[name]) <= 2e-3, name


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("res", ["none", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_large_tensor_64bit_indexing(layout, res):
    """More than 2^31 elements (> 4 GiB per fp16 tensor): indices past 2^31 must be right."""
    shape = (2, 4, 16384, 16385)  # 2,147,614,720 elements > 2^31
    tensors = 6 if res == "plain" else 4  # x, r, out, go, gx, gr (no r, gr without a residual)
    need = (tensors + 1) * 2 * 2 ** 31 + 2 ** 32  # fp16 + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free GPU memory, {free / 2**30:.0f} GiB free")
    fmt = LAYOUTS[layout]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(memory_format=fmt)
    r = None
    if res == "plain":
        r = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(memory_format=fmt)
    s = torch.rand(4, device="cuda") + 0.5
    b = torch.randn(4, device="cuda")

    def pre(n, c):
        return x[n, c].float() * s[c] + b[c] + (r[n, c].float() if r is not None else 0)

    out = tail(x, s, b, r, raw=True)
    # Check the first and the last plane (the last lies past element 2^31 in both layouts' flat order).
    for n in (0, 1):
        for c in (0, 3):
            assert rel_err(out[n, c], torch.relu(pre(n, c))) <= 2e-3
    del out
    go = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(memory_format=fmt)
    bwd = tail_backward(go, x, s, b, r, None, None, True)
    gx, sg = bwd["grad_x"], bwd["sum_g"]
    del bwd
    for c in (0, 3):
        ref_sg = 0.0
        for n in (0, 1):
            m = pre(n, c) > 0
            gm = go[n, c].float() * m
            ref_sg += gm.sum(dtype=torch.float64).item()
            assert rel_err(gx[n, c], gm * s[c]) <= 2e-3
        assert abs(sg[c].item() - ref_sg) <= 1e-4 * max(1.0, abs(ref_sg)) + 1e-3 * (shape[2] * shape[3]) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["none", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_relu_threshold_is_exactly_zero(layout, res, device):
    """Pre-activations packed within ±0.01 of the kink: a mask at any threshold but 0 (or a strict/non-strict
    mix-up that zeroes small positives) changes most of the output and of the gradient."""
    shape = (2, 8, 4, 5)
    g = torch.Generator().manual_seed(11)
    fmt = LAYOUTS[layout]
    z = (torch.rand(shape, generator=g) * 0.02 - 0.01).double()  # the pre-activation
    r = torch.randn(shape, generator=g).double()
    if res == "none":
        r = torch.zeros_like(r)
    s = torch.rand(8, generator=g).double() + 0.5
    b = torch.randn(8, generator=g).double() * 0.1
    x = (z - r - b.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)  # so that x*s + b + r == z
    x, r = (t.to(device).contiguous(memory_format=fmt) for t in (x, r))
    x.requires_grad_(True)
    out = tail(x, s.to(device), b.to(device), None if res == "none" else r)
    ref = torch.relu(z)
    assert rel_err(out.cpu(), ref) < 1e-9
    grad = torch.randn(shape, generator=g).double()
    (gx,) = torch.autograd.grad(out, x, grad.to(device))
    assert rel_err(gx.cpu(), grad * (z > 0) * s.view(1, -1, 1, 1)) < 1e-9
