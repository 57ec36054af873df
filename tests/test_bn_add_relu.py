"""bn_add_relu (csrc/ kernels through resnet_fast.ops.bn_add_relu) against a float64 reference.

Errors are relative norms ||out - ref|| / ||ref|| with per-dtype tolerances. CPU tests run the C++ kernels;
the same tests run on CUDA where there is a GPU (``gpu`` marker), plus CUDA-only cases (misaligned pointers,
a tensor over 2^31 bytes).
"""
import pytest
import torch

import resnet_fast
from resnet_fast import _ext
from resnet_fast.ops import bn_add_relu
from resnet_fast.ops.bn_add_relu import bn_add_relu_reference

OP = torch.ops.resnet_fast.bn_add_relu if _ext.available() else None
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
    return x, s, b, r, rs, rb


def reference(x, s, b, r, rs, rb, relu):
    """Float64 reference expression; leaves are float64 copies that autograd differentiates."""
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    rr = r.double() * v(rs) + v(rb) if rs is not None else r.double()
    z = x.double() * v(s) + v(b) + rr
    return torch.relu(z) if relu else z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("res_bn", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_vs_float64(dtype, layout, res_bn, relu, shape, device):
    x, s, b, r, rs, rb = make_inputs(shape, dtype, layout, res_bn, device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, s, b, r) + ((rs, rb) if res_bn else ())]
    out = bn_add_relu(*leaves[:4], *(leaves[4:] if res_bn else (None, None)), relu=relu)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=LAYOUTS[layout])

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves[:4], *(ref_leaves[4:] if res_bn else (None, None)), relu)
    assert rel_err(out, ref) <= TOL[dtype]

    go = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    grads = torch.autograd.grad(out, leaves, go)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    names = ["x", "scale", "shift", "residual", "res_scale", "res_shift"]
    for name, gk, gr in zip(names, grads, ref_grads):
        tol = TOL[dtype] if name in ("x", "residual") else SUM_TOL[dtype]
        assert gk.dtype == leaves[names.index(name)].dtype, name
        assert rel_err(gk, gr) <= tol, f"grad {name}: {rel_err(gk, gr):.3g} > {tol}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_op_sums(layout, device):
    """The raw backward op: sum_gr = Σ g·residual even without res_scale; mask recomputed from the inputs."""
    x, s, b, r, _, _ = make_inputs((4, 16, 32, 32), torch.float32, layout, False, device)  # several chunks
    go = torch.randn_like(x)
    gx, gr, sg, sgx, sgr = torch.ops.resnet_fast.bn_add_relu_backward(go, x, s, b, r, None, None, True)
    z = reference(x, s, b, r, None, None, relu=False)
    g = go.double() * (z > 0)
    assert rel_err(gx, g * s.double().view(1, -1, 1, 1)) <= 1e-6
    assert rel_err(gr, g) <= 1e-6
    assert gx.is_contiguous(memory_format=LAYOUTS[layout]) and gr.is_contiguous(memory_format=LAYOUTS[layout])
    assert rel_err(sg, g.sum((0, 2, 3))) <= 1e-5
    assert rel_err(sgx, (g * x.double()).sum((0, 2, 3))) <= 1e-5
    assert rel_err(sgr, (g * r.double()).sum((0, 2, 3))) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_deterministic(layout, device):
    x, s, b, r, rs, rb = make_inputs((4, 16, 24, 24), torch.float32, layout, True, device)
    go = torch.randn_like(x)
    args = (go, x, s, b, r, rs, rb, True)
    first = torch.ops.resnet_fast.bn_add_relu_backward(*args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the CPU partition depends on the shape only, not on the thread count
        second = torch.ops.resnet_fast.bn_add_relu_backward(*args)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("res_bn", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64(layout, res_bn, relu):
    x, s, b, r, rs, rb = make_inputs((2, 3, 3, 4), torch.float64, layout, res_bn, seed=3)
    ins = [t.requires_grad_() for t in (x, s, b, r) + ((rs, rb) if res_bn else ())]
    z = reference(x, s, b, r, rs, rb, relu=False)
    assert z.abs().min() > 1e-4  # keep the ReLU kink away from the finite-difference steps

    def f(*t):
        return bn_add_relu(*t[:4], *(t[4:] if res_bn else (None, None)), relu=relu)

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_empty_batch(layout, device):
    x, s, b, r, rs, rb = make_inputs((0, 4, 3, 3), torch.float32, layout, True, device)
    x.requires_grad_()
    s.requires_grad_()
    out = bn_add_relu(x, s, b, r, rs, rb)
    assert out.shape == (0, 4, 3, 3) and out.is_contiguous(memory_format=LAYOUTS[layout])
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(s.grad, torch.zeros(4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_out_and_sum(device):
    """out.sum().backward() hands the op an expanded (stride-0) gradient: densified, then the kernel."""
    x, s, b, r, rs, rb = make_inputs((2, 8, 4, 4), torch.float32, "nhwc", True, device)
    x.requires_grad_()
    bn_add_relu(x, s, b, r, rs, rb).sum().backward()
    z = reference(x.detach(), s, b, r, rs, rb, relu=False)
    assert rel_err(x.grad, (z > 0).double() * s.double().view(1, -1, 1, 1)) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_pointers(device):
    """A storage offset of one element defeats 16-byte alignment: the scalar path must give the same result."""
    shape = (2, 16, 4, 4)
    numel = 2 * 16 * 16
    x = torch.randn(numel + 1, device=device)[1:].view(shape)
    r = torch.randn(numel + 1, device=device)[1:].view(shape)
    s, b = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device)
    out = bn_add_relu(x, s, b, r)
    assert rel_err(out, reference(x, s, b, r, None, None, True)) <= 1e-6
    go = torch.randn(numel + 1, device=device)[1:].view(shape)
    gx, gr, sg, sgx, sgr = torch.ops.resnet_fast.bn_add_relu_backward(go, x, s, b, r, None, None, True)
    g = go.double() * (reference(x, s, b, r, None, None, False) > 0)
    assert rel_err(gx, g * s.double().view(1, -1, 1, 1)) <= 1e-6
    assert rel_err(sgx, (g * x.double()).sum((0, 2, 3))) <= 1e-5


def test_eager_backend_matches_kernel(eager_backend):
    x, s, b, r, rs, rb = make_inputs((2, 8, 3, 3), torch.float32, "nchw", True)
    eager = bn_add_relu(x, s, b, r, rs, rb)
    assert resnet_fast.stats()["kernel_calls"].get("bn_add_relu", 0) == 0
    assert rel_err(eager, OP(x, s, b, r, rs, rb)) <= 1e-6


def test_kernel_call_counted(triton_backend):
    x, s, b, r, _, _ = make_inputs((1, 4, 2, 2), torch.float32, "nchw", False)
    bn_add_relu(x, s, b, r)
    assert resnet_fast.stats()["kernel_calls"]["bn_add_relu"] == 1


# ---------------------------------------------------------------------------------------------------- errors

def _good(shape=(2, 4, 3, 3)):
    return make_inputs(shape, torch.float32, "nchw", True)


@pytest.mark.parametrize("via", ["wrapper", "op"])
@pytest.mark.parametrize("case,match", [
    ("x_int", r"x must be float32, float16, bfloat16 or float64"),
    ("x_3d", r"x must be a 4-D"),
    ("residual_dtype", r"residual has dtype"),
    ("residual_shape", r"residual has shape"),
    ("scale_len", r"scale must have shape \[C\] = \[4\]"),
    ("scale_dtype", r"scale must be Float"),
    ("shift_2d", r"shift must have shape \[C\]"),
    ("res_shift_missing", r"res_scale and res_shift must be given together"),
    ("x_strided", r"x must be dense NCHW-contiguous or channels_last"),
    ("residual_layout", r"residual must be dense in the same memory format as x"),
])
def test_bad_inputs(case, match, via):
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
    fn = bn_add_relu if via == "wrapper" else OP
    with pytest.raises(ValueError, match=match):
        fn(x, s, b, r, rs, rb)


def test_bad_grad_out():
    x, s, b, r, rs, rb = _good()
    with pytest.raises(ValueError, match=r"grad_out has shape"):
        torch.ops.resnet_fast.bn_add_relu_backward(x[:1], x, s, b, r, rs, rb, True)
    with pytest.raises(ValueError, match=r"grad_out must be dense in the same memory format"):
        go = x.contiguous(memory_format=torch.channels_last)
        torch.ops.resnet_fast.bn_add_relu_backward(go, x, s, b, r, rs, rb, True)


def test_device_mismatch():
    x, s, b, r, rs, rb = _good()
    with pytest.raises(ValueError, match=r"scale is on meta but x is on cpu"):
        bn_add_relu(x, s.to("meta"), b, r, rs, rb)
    with pytest.raises(ValueError, match=r"residual must be a torch.Tensor"):
        bn_add_relu(x, s, b, 1.0)


@pytest.mark.gpu
def test_device_mismatch_cuda():
    x, s, b, r, rs, rb = make_inputs((2, 4, 3, 3), torch.float32, "nchw", True, "cuda")
    with pytest.raises(ValueError, match=r"scale is on cpu but x is on cuda"):
        OP(x, s.cpu(), b, r, rs, rb)  # the C++ check (the wrapper's would catch it first)


# ------------------------------------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph():
    x, s, b, r, rs, rb = make_inputs((2, 8, 4, 4), torch.float32, "nhwc", True)

    def f(x, s, b, r, rs, rb):
        return bn_add_relu(x * 2, s, b, r, rs, rb).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [t.detach().clone().requires_grad_() for t in (x, s, b)]
    xe = [t.detach().clone().requires_grad_() for t in (x, s, b)]
    yc, ye = cf(*xs, r, rs, rb), f(*xe, r, rs, rb)
    assert rel_err(yc, ye) <= 1e-6
    yc.backward()
    ye.backward()
    for a, e in zip(xs, xe):
        assert rel_err(a.grad, e.grad) <= 1e-6


@pytest.mark.parametrize("res_bn", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck(layout, res_bn):
    x, s, b, r, rs, rb = make_inputs((2, 4, 3, 3), torch.float32, layout, res_bn)
    for t in (x, s, b, r) + ((rs, rb) if res_bn else ()):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu.default, (x, s, b, r, rs, rb, True))
    go = torch.randn_like(x)
    det = [t.detach() if t is not None else None for t in (x, s, b, r, rs, rb)]
    args = (go, *det, True)
    torch.library.opcheck(torch.ops.resnet_fast.bn_add_relu_backward.default, args)


# ---------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_matches_cpu_kernel(layout):
    x, s, b, r, rs, rb = make_inputs((4, 64, 14, 14), torch.float16, layout, True)
    go = torch.randn_like(x)
    cpu = torch.ops.resnet_fast.bn_add_relu_backward(go, x, s, b, r, rs, rb, True)
    cuda = torch.ops.resnet_fast.bn_add_relu_backward(*(t.cuda() if isinstance(t, torch.Tensor) else t
                                                        for t in (go, x, s, b, r, rs, rb, True)))
    for a, c in zip(cpu, cuda):
        assert rel_err(c.cpu(), a) <= 2e-3


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_large_tensor_64bit_indexing(layout):
    """More than 2^31 elements (> 4 GiB per fp16 tensor): indices past 2^31 must be right."""
    shape = (2, 4, 16384, 16385)  # 2,147,614,720 elements > 2^31
    need = 7 * 2 * 2 ** 31 + 2 ** 32  # x, r, out, go, gx, gr in fp16 + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free GPU memory, {free / 2**30:.0f} GiB free")
    fmt = LAYOUTS[layout]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(memory_format=fmt)
    r = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(memory_format=fmt)
    s = torch.rand(4, device="cuda") + 0.5
    b = torch.randn(4, device="cuda")
    out = OP(x, s, b, r)
    # Check the first and the last plane (the last lies past element 2^31 in both layouts' flat order).
    for n in (0, 1):
        for c in (0, 3):
            ref = torch.relu(x[n, c].float() * s[c] + b[c] + r[n, c].float())
            assert rel_err(out[n, c], ref) <= 2e-3
    del out
    go = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(memory_format=fmt)
    gx, gr, sg, sgx, sgr = torch.ops.resnet_fast.bn_add_relu_backward(go, x, s, b, r, None, None, True)
    for c in (0, 3):
        ref_sg = 0.0
        for n in (0, 1):
            m = (x[n, c].float() * s[c] + b[c] + r[n, c].float()) > 0
            gm = go[n, c].float() * m
            ref_sg += gm.sum(dtype=torch.float64).item()
            assert rel_err(gx[n, c], gm * s[c]) <= 2e-3
        assert abs(sg[c].item() - ref_sg) <= 1e-4 * max(1.0, abs(ref_sg)) + 1e-3 * (shape[2] * shape[3]) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_relu_threshold_is_exactly_zero(layout, device):
    """Pre-activations packed within ±0.01 of the kink: a mask at any threshold but 0 (or a strict/non-strict
    mix-up that zeroes small positives) changes most of the output and of the gradient."""
    shape = (2, 8, 4, 5)
    g = torch.Generator().manual_seed(11)
    fmt = LAYOUTS[layout]
    z = (torch.rand(shape, generator=g) * 0.02 - 0.01).double()  # the pre-activation
    r = torch.randn(shape, generator=g).double()
    s = torch.rand(8, generator=g).double() + 0.5
    b = torch.randn(8, generator=g).double() * 0.1
    x = (z - r - b.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)  # so that x*s + b + r == z
    x, r = (t.to(device).contiguous(memory_format=fmt) for t in (x, r))
    x.requires_grad_(True)
    out = bn_add_relu(x, s.to(device), b.to(device), r)
    ref = torch.relu(z)
    assert rel_err(out.cpu(), ref) < 1e-9
    grad = torch.randn(shape, generator=g).double()
    (gx,) = torch.autograd.grad(out, x, grad.to(device))
    assert rel_err(gx.cpu(), grad * (z > 0) * s.view(1, -1, 1, 1)) < 1e-9
