"""Per-block benchmarks (train and eval), resnet_fast vs eager, on the shapes of ``resnet_fast.bench.shapes``.

pytest-benchmark times each call on the host (the call synchronizes the device, so it is whole-call latency);
the device-time median from CUDA events (``resnet_fast.bench.timing``) is stored in ``extra_info["cuda_ms"]``
and is the figure to quote. A resnet_fast block whose ops fell back to eager is marked in ``extra_info``.
"""
import pytest
import torch

from resnet_fast.bench import impls, reference, shapes
from resnet_fast.bench.runner import Unavailable, _kernel_stats, kernel_path
from resnet_fast.bench.timing import measure

CASES = [(model, shape) for model in shapes.ARCHS for shape in shapes.blocks(model)]


@pytest.mark.parametrize("impl", ["resnet_fast", "eager"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("model, shape", CASES, ids=[f"{m}:{s.name}" for m, s in CASES])
def test_block(benchmark, model, shape, mode, impl, bench_batch, bench_resolution):
    if bench_resolution != 224:  # the parametrization is at 224; re-derive the matching block at this size
        shape = list(shapes.blocks(model, bench_resolution))[list(shapes.blocks(model)).index(shape)]
    ref = reference.block(shape)
    try:
        m = impls.module_for(impl, ref, "cuda", "channels_last", lambda: impls.rf_block(shape, ref))
    except Unavailable as exc:
        pytest.skip(f"unavailable: {exc}")
    m.train(mode == "train")
    x = torch.randn(bench_batch, shape.inplanes, shape.h, shape.w, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(mode == "train")
    ho, wo = shape.out_hw
    g = torch.randn(bench_batch, shape.out_channels, ho, wo, device="cuda", dtype=torch.bfloat16)
    g = g.contiguous(memory_format=torch.channels_last)
    params = list(m.parameters())

    def step(i=0):
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
            out = m(x)
        if mode == "train":
            torch.autograd.grad(out, [x] + params, g)

    before = _kernel_stats()
    t = measure(step, warmup=3, repeats=30)
    benchmark.extra_info.update(cuda_ms=t.median, cuda_p20=t.p20, cuda_p80=t.p80,
                                tflops=(3 if mode == "train" else 1) * shape.flops(bench_batch) / (t.median * 1e-3)
                                / 1e12, **kernel_path(before, _kernel_stats()))

    def synced():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=20, warmup_rounds=2)
