#!/usr/bin/env python
"""Compiles every variant of the Triton deformable-conv kernels that the GPU check's later steps
launch, in parallel over the machine's cores, into Triton's cache (the check's first step after
``environment``): the later steps then load each variant instead of compiling it, one at a time,
inside their own timeouts.

    python tools/device/compile_kernels.py --output compile.json     # for this machine's GPU
    python tools/device/compile_kernels.py --arch 90 --count-only    # no GPU needed: count them

A variant is what Triton compiles once: a kernel with its argument types, the specialisation of
its arguments (integers equal to 1 or divisible by 16, pointers aligned to 16 bytes) and its
constexprs. The deformable convs come from the CUDA tests' cases (``tests/test_cuda.py``), the
models of ``train_step.py``'s configs in each precision, and ``tools/benchmark_deform.py``'s
shapes. Without a GPU (``--arch``), the kernels compile for that architecture as the test
``test_kernels_compile_for_hopper_without_a_gpu`` does.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, NamedTuple

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tools" / "device"), str(REPO / "tools"), str(REPO / "tests")]
MODULE = "saltnet.layers.triton_deform"


class Conv(NamedTuple):
    """One deformable conv as the kernels see it; spatial sizes are unspecialised."""

    c_in: int
    c_out: int
    groups: int
    stride: int
    modulated: bool
    bias: bool
    dtype: torch.dtype
    size: int = 3  # input height and width: any size names the same variants

    def tensors(self):
        """(x, offset, mask, weight, bias) on the CPU, batch 1."""
        h_out = (self.size - 1) // self.stride + 1
        return (
            torch.zeros(1, self.c_in, self.size, self.size),
            torch.zeros(1, 18, h_out, h_out),
            torch.zeros(1, 9, h_out, h_out) if self.modulated else None,
            torch.zeros(self.c_out, self.c_in // self.groups, 3, 3),
            torch.zeros(self.c_out) if self.bias else None,
        )


def test_convs() -> List[Conv]:
    """The Triton calls of tests/test_cuda.py: every case in fp32, ``HALF_CASES`` in each half
    precision; their inputs come from test_triton_deform's ``_case`` (with a bias)."""
    import inspect

    from test_cuda import CASES, HALF_CASES
    from test_triton_deform import _case

    defaults = {k: p.default for k, p in inspect.signature(_case).parameters.items()}
    convs = []
    for name, (kwargs, stride) in CASES.items():
        case = dict(defaults, **kwargs)
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if name in HALF_CASES else [])
        convs += [Conv(case["c_in"], case["c_out"], case["groups"], stride, case["modulated"],
                       True, dtype) for dtype in dtypes]
    return convs


def model_convs(configs, dtypes) -> List[Conv]:
    """The deformable convs of these configs' models (built on the meta device: no memory, no
    initialisation), in each of ``dtypes``."""
    from train_step import build

    from saltnet.layers import DeformConv, ModulatedDeformConv

    convs = set()
    for config in configs:
        with torch.device("meta"):
            model = build(config, "triton", "meta")
        for m in model.modules():
            if isinstance(m, (DeformConv, ModulatedDeformConv)):
                convs.update(Conv(m.in_channels, m.out_channels, m.groups, m.stride[0],
                                  isinstance(m, ModulatedDeformConv), m.bias is not None, dtype)
                             for dtype in dtypes)
    return sorted(convs, key=str)


def benchmark_convs() -> List[Conv]:
    """tools/benchmark_deform.py's shapes, Triton in fp32 and bf16 (no mask, no bias)."""
    from benchmark_deform import DEFAULT_SHAPES

    return [Conv(c, c, groups, 1, False, False, dtype)
            for _, _, c, _, _, groups in DEFAULT_SHAPES
            for dtype in (torch.float32, torch.bfloat16)]


def check_convs() -> List[Conv]:
    """Every Triton deformable conv the check's steps run: the CUDA tests, train_step.py's
    configs (and so model_speed's models) in float32 and the AMP precisions, the
    deformable-conv table's shapes."""
    from train_step import CONFIGS

    from saltnet.config.checks import AMP_PRECISIONS

    dtypes = [torch.float32, *AMP_PRECISIONS.values()]
    return test_convs() + model_convs(CONFIGS, dtypes) + benchmark_convs()


def variants(convs, target) -> dict:
    """{key: (kernel name, signature, constexprs, attrs, options)}: the distinct compilations the
    kernel launches of ``convs`` (forward and backward) make on ``target``, found as Triton's own
    launch finds them (its argument binder, then its packing of the compile arguments)."""
    import importlib

    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    triton_deform = importlib.import_module(MODULE)
    backend = make_backend(target)
    found = {}
    for conv in convs:
        launches = triton_deform.kernel_launches(*conv.tensors(), (conv.stride,) * 2, (1, 1),
                                                 conv.dtype)
        for kernel, _, args, flags in launches:
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            kwargs = dict(flags, debug=kernel.debug or knobs.runtime.debug,
                          instrumentation_mode=knobs.compilation.instrumentation_mode)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(
                backend, kwargs, bound, specialization, options)
            name = kernel.fn.__name__
            key = repr((name, signature, sorted(constexprs.items()), sorted(attrs.items())))
            found.setdefault(key, (name, signature, constexprs, attrs, options.__dict__))
    return found


def _compile(name, signature, constexprs, attrs, options, target, launcher):
    """Compiles one variant into Triton's cache and, on a GPU machine, its launcher; returns
    (seconds, whether the launcher was built)."""
    import importlib

    import triton
    from triton.compiler import ASTSource

    start = time.perf_counter()
    kernel = getattr(importlib.import_module(MODULE), name)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options)
    built = False
    if launcher:  # the C launcher Triton builds with the host compiler at the first launch
        from triton.runtime import driver

        try:  # a help only: the first launch builds it otherwise
            driver.active.launcher_cls(compiled.src, compiled.metadata)
            built = True
        except Exception as e:
            print(f"launcher of {name} not built: {type(e).__name__}: {e}", flush=True)
    return time.perf_counter() - start, built


def target_of(arch):
    """The GPUTarget to compile for: sm_``arch`` (no GPU needed), or this machine's GPU."""
    from triton.backends.compiler import GPUTarget

    if arch is not None:
        return GPUTarget("cuda", arch, 32)
    from triton.runtime import driver

    return driver.active.get_current_target()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, help="compile for sm_ARCH without a GPU (e.g. 90)")
    parser.add_argument("--count-only", action="store_true", help="count, compile nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    parser.add_argument("--output", help="also write the counts and seconds as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    target = target_of(args.arch)
    found = variants(check_convs(), target)
    per_kernel = {}
    for name, *_ in found.values():
        per_kernel[name] = per_kernel.get(name, 0) + 1
    result = {"target": f"{target.backend} sm_{target.arch}", "variants": len(found),
              "per_kernel": per_kernel, "enumerate_s": round(time.perf_counter() - start, 1)}
    print(f"variants: {json.dumps(result)}", flush=True)
    if not args.count_only:
        compile_start = time.perf_counter()
        launcher = args.arch is None
        # spawned workers: the parent may have started CUDA, which a fork must not inherit
        with ProcessPoolExecutor(max_workers=args.jobs,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_compile, *zip(*[
                (*variant, target, launcher) for variant in found.values()])))
        result.update(jobs=args.jobs, launchers=sum(built for _, built in done),
                      compile_s=round(time.perf_counter() - compile_start, 1),
                      worker_s=round(sum(seconds for seconds, _ in done), 1))
        print(f"compiled: {json.dumps(result)}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
