"""bn_add_relu and its residual-free form bn_relu (csrc/ kernels through resnet_fast.ops.bn_add_relu) against a
float64 reference.

Most tests are parametrized over the residual mode ``res``: "none" (bn_relu: the kernels with kHasRes = false),
"plain" (bn_add_relu with a residual) and "bn" (bn_add_relu with the residual's own affine).
Errors are relative norms ||out - ref|| / ||ref|| with per-dtype tolerances. CPU tests run the C++ kernels;
the same tests run on CUDA where there is a GPU (``gpu`` marker), plus CUDA-only cases (misaligned pointers,
a tensor over 2^31 bytes).
"""
import pytest
import torch

import resnet_fast
from resnet_fast import _ext
from resnet_fast.ops import bn_add_relu, bn_relu
from resnet_fast.ops.bn_add_relu import bn_add_relu_reference

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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


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


def tail(x, s, b, r=None, rs=None, rb=None, relu=True, raw=False):
    """bn_relu when r is None, else bn_add_relu; raw: the torch.ops op instead of the Python wrapper."""
    if r is None:
        return (OP_NO_RES if raw else bn_relu)(x, s, b, relu)
    return (OP if raw else bn_add_relu)(x, s, b, r, rs, rb, relu)


def tail_backward(go, x, s, b, r=None, rs=None, rb=None, relu=True):
    """The raw backward op's outputs by name: grad_x, sum_g, sum_gx (+ grad_residual, sum_gr with a residual)."""
    if r is None:
        return dict(zip(("grad_x", "sum_g", "sum_gx"), torch.ops.resnet_fast.bn_relu_backward(go, x, s, b, relu)))
    return dict(zip(("grad_x", "grad_residual", "sum_g", "sum_gx", "sum_gr"),
                    torch.ops.resnet_fast.bn_add_relu_backward(go, x, s, b, r, rs, rb, relu)))


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
