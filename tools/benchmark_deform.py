#!/usr/bin/env python
"""Speed of one 3 x 3 deformable convolution on each backend, against a dense convolution.

    python tools/benchmark_deform.py                 # GPU: head P3-P7 and backbone res4/res5
    python tools/benchmark_deform.py --shapes 2x256x40x60 --methods torchvision gather dense
    TRITON_INTERPRET=1 python tools/benchmark_deform.py --smoke   # tiny CPU run (tests)

For each shape (N x C x H x W, C -> C channels, stride 1, padding 1, offsets of a few pixels):
forward and forward+backward milliseconds (median over --iters after --warmup) of torchvision's
``deform_conv2d`` (fp32), the ``gather`` backend (fp32), the Triton kernels (fp32, bf16) and a
dense ``conv2d`` (fp32, bf16, bf16 channels-last), and through the layer any other backend of
``saltnet.layers.available_backends()`` (fp32); the ratio of each to the bf16 channels-last
dense conv and to torchvision; each method's largest output difference from torchvision
relative to torchvision's largest output (fp32 methods should be ~1e-6); and, apart, the time of
the first forward and forward+backward, where Triton compiles its kernels.
Default shapes: the SALT head's P3-P7 of an 800 x 1344 (padded 800 x 1333) batch of 8, and the
3 x 3 convs of the deformable res4 / res5 stages of R-101 (1 group) and X-101 32x4d (32 groups)
at that size.
"""

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

from saltnet.layers import DeformConv, available_backends
from saltnet.layers.deform_conv import _triton_module
from saltnet.layers.gather_deform import gather_deform_conv2d

# (label, N, C, H, W, groups)
DEFAULT_SHAPES = [
    ("P3", 8, 256, 100, 168, 1),
    ("P4", 8, 256, 50, 84, 1),
    ("P5", 8, 256, 25, 42, 1),
    ("P6", 8, 256, 13, 21, 1),
    ("P7", 8, 256, 7, 11, 1),
    ("R101 res4", 8, 256, 50, 84, 1),
    ("R101 res5", 8, 512, 25, 42, 1),
    ("X101 res4", 8, 512, 50, 84, 32),
    ("X101 res5", 8, 1024, 25, 42, 32),
]
SMOKE_SHAPES = [("smoke", 1, 16, 6, 8, 1)]
REFERENCE = "dense bf16 CL"


def methods(device):
    """name -> (dtype, channels_last, fn(x, offset, weight) -> output)."""
    table = {
        "torchvision": (torch.float32, False, lambda x, o, w, g: deform_conv2d(x, o, w, padding=1)),
        "gather": (
            torch.float32,
            False,
            lambda x, o, w, g: gather_deform_conv2d(x, o, None, w, None, (1, 1), (1, 1), (1, 1), g),
        ),
    }
    triton_deform = _triton_module()
    if triton_deform is not None and (device == "cuda") != triton_deform.INTERPRETED:

        def triton_fn(x, o, w, g):
            return triton_deform.triton_deform_conv2d(x, o, None, w, None, (1, 1), (1, 1), (1, 1))

        table["triton fp32"] = (torch.float32, False, triton_fn)
        table["triton bf16"] = (torch.bfloat16, False, triton_fn)

    for backend in available_backends():  # the others that run here, by name
        if backend != "auto" and not any(name.split()[0] == backend for name in table):
            table[backend] = (torch.float32, False, _through_layer(backend))

    def dense(x, o, w, g):
        return F.conv2d(x, w, padding=1, groups=g)

    table["dense fp32"] = (torch.float32, False, dense)
    table["dense bf16"] = (torch.bfloat16, False, dense)
    table[REFERENCE] = (torch.bfloat16, True, dense)
    return table


def _through_layer(backend):
    """fn(x, offset, weight, groups): a DeformConv on ``backend`` (padding 1, no bias) with
    this weight."""

    def fn(x, o, w, g):
        with torch.device("meta"):  # no memory, no initialisation: the weight is w
            layer = DeformConv(x.shape[1], w.shape[0], 3, padding=1, groups=g, backend=backend)
        return torch.func.functional_call(layer, {"weight": w}, (x, o))

    return fn


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(shape, names, device, warmup, iters):
    """{method: {"fwd_ms", "fwd_bwd_ms", "max_rel_diff"}} for one shape."""
    _, n, c, h, w, groups = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    offset = (torch.rand(n, 18, h, w, generator=gen) - 0.5) * 4
    weight = torch.randn(c, c // groups, 3, 3, generator=gen) / (9 * c // groups) ** 0.5
    table = methods(device)
    results, reference = {}, None
    for name in names:
        if name not in table:
            results[name] = {"error": "not available here"}
            continue
        dtype, channels_last, fn = table[name]
        memory = torch.channels_last if channels_last else torch.contiguous_format
        xi = x.to(device, dtype).contiguous(memory_format=memory).requires_grad_(True)
        oi = offset.to(device).requires_grad_(True)
        wi = weight.to(device, dtype).contiguous(memory_format=memory).requires_grad_(True)
        grad = torch.ones(n, c, h, w, device=device, dtype=dtype)

        def forward():
            with torch.no_grad():
                return fn(xi, oi, wi, groups)

        def forward_backward():
            torch.autograd.backward(fn(xi, oi, wi, groups), grad)

        start = time.perf_counter()  # the first calls: Triton compiles its kernels here
        out = forward().float().cpu()
        forward_backward()
        _sync(device)
        first_ms = (time.perf_counter() - start) * 1000
        if name == "torchvision":
            reference = out
        row = {
            "first_call_ms": first_ms,
            "fwd_ms": time_ms(forward, device, warmup, iters),
            "fwd_bwd_ms": time_ms(forward_backward, device, warmup, iters),
        }
        if reference is not None and not name.startswith("dense"):
            row["max_rel_diff"] = ((out - reference).abs().max() / reference.abs().max()).item()
        results[name] = row
    return results


def format_table(all_results):
    lines = [
        "| shape | method | fwd ms | fwd+bwd ms | fwd+bwd / dense bf16 CL | fwd+bwd / torchvision "
        "| max rel. diff vs torchvision | first fwd + fwd+bwd ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, results in all_results.items():
        ref = results.get(REFERENCE, {}).get("fwd_bwd_ms")
        tv = results.get("torchvision", {}).get("fwd_bwd_ms")
        for name, row in results.items():
            if "error" in row:
                lines.append(f"| {label} | {name} | {row['error']} | | | | | |")
                continue
            ms = row["fwd_bwd_ms"]
            ratio_ref = f"{ms / ref:.2f}" if ref else "-"
            ratio_tv = f"{ms / tv:.2f}" if tv else "-"
            diff = f"{row['max_rel_diff']:.1e}" if "max_rel_diff" in row else "-"
            lines.append(
                f"| {label} | {name} | {row['fwd_ms']:.2f} | {ms:.2f} | {ratio_ref} | {ratio_tv} "
                f"| {diff} | {row['first_call_ms']:.0f} |"
            )
    return "\n".join(lines)


def _parse_shape(text):
    parts = text.split("x")
    if len(parts) not in (4, 5) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxCxHxW or NxCxHxWxGROUPS")
    n, c, h, w, groups = (list(map(int, parts)) + [1])[:5]
    return (text, n, c, h, w, groups)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, one iteration")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, help="NxCxHxW[xGROUPS] each")
    parser.add_argument("--methods", nargs="+", help="subset of the methods, in this order")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    warmup, iters = (0, 1) if args.smoke else (args.warmup, args.iters)
    names = args.methods or list(methods(device))
    if "torchvision" in names:  # first: the others are compared with it
        names = ["torchvision"] + [n for n in names if n != "torchvision"]
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    all_results = {}
    for shape in shapes:
        all_results[shape[0]] = measure(shape, names, device, warmup, iters)
        print(f"{shape[0]} {shape[1:]}: {json.dumps(all_results[shape[0]])}", flush=True)
    print(format_table(all_results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(all_results, f, indent=2)
    return all_results


if __name__ == "__main__":
    main()
