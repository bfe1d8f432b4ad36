#!/usr/bin/env python
"""Speed of SALT-Net, detectron2's own FCOS and RetinaNet, and both with SALT, in one process.

    python tools/benchmark.py                      # GPU: 800 x 1333, batch 1 and 8, fp32 and AMP
    python tools/benchmark.py --smoke              # CPU smoke run: tiny images, few iterations
    python tools/benchmark.py --plot bench.json    # table and chart of a stored --output JSON
    python tools/benchmark.py --flops              # GFLOPs of each model instead (any device)
    python tools/benchmark.py --profile --models "SALT-Net R50-FPN"   # where inference spends

For each model: inference images/s at each batch size (postprocessing included), training
iterations/s (SGD step included), each in fp32 and under autocast (AMP), peak GPU memory, and
the ratios SALT-Net / FCOS, SALT-Net / RetinaNet and the cost of the SALT plug-in (FCOS + SALT /
FCOS, RetinaNet + SALT / RetinaNet) from the same run. Weights are random:
speed does not depend on them. A measurement that fails (e.g. a model that breaks under AMP) is
reported as the error instead of a number. With ``--output``, a bar chart of the throughputs
is written next to the JSON (same name, ``.png``; needs matplotlib, ``pip install .[plots]``).
``--flops`` times nothing: it counts each model's multiply-adds for one --height x --width image
(detectron2's FLOP counter with saltnet's deformable-conv handles, ``saltnet.layers.flops``), the
deformable convs' share, and each model's count relative to FCOS's and RetinaNet's: the ceiling
of the throughput ratios. ``--profile`` times nothing either: it prints each model's operators by
self CPU time over --iters fp32 inferences at batch 1 (``torch.profiler``).
"""

import saltnet  # noqa: F401  # isort: skip (first: it filters known third-party warnings)
import argparse
import json
import time
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from saltnet.config.defaults import load_yaml_config
from saltnet.layers import DeformConv, ModulatedDeformConv
from saltnet.layers.flops import FlopCountAnalysis

REPO = Path(__file__).resolve().parents[1]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_saltnet(num_classes):
    cfg = load_yaml_config(
        str(REPO / "configs" / "salt_R_50_FPN_1x.yaml"),
        ["MODEL.SALTNET.NUM_CLASSES", num_classes, "MODEL.DEVICE", _device()],
    )
    return build_model(cfg)


def build_retinanet(num_classes):
    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = _device()
    return build_model(cfg)


def build_fcos(num_classes):
    cfg = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
    cfg.model.num_classes = num_classes
    return instantiate(cfg.model).to(_device())


def _build_plugin(name):
    def build(num_classes):
        cfg = LazyConfig.load(str(REPO / "configs" / "plugin" / f"{name}_R_50_FPN_1x_salt.py"))
        cfg.model.num_classes = num_classes
        return instantiate(cfg.model).to(_device())

    return build


MODELS = {
    "SALT-Net R50-FPN": build_saltnet,
    "FCOS R50-FPN": build_fcos,
    "RetinaNet R50-FPN": build_retinanet,
    "FCOS+SALT R50-FPN": _build_plugin("fcos"),
    "RetinaNet+SALT R50-FPN": _build_plugin("retinanet"),
}
# Column name -> (numerator, denominator): ratios of the same metric, from the same run.
RATIOS = {
    "SALT/FCOS": ("SALT-Net R50-FPN", "FCOS R50-FPN"),
    "SALT/RetinaNet": ("SALT-Net R50-FPN", "RetinaNet R50-FPN"),
    "FCOS+SALT/FCOS": ("FCOS+SALT R50-FPN", "FCOS R50-FPN"),
    "RetinaNet+SALT/RetinaNet": ("RetinaNet+SALT R50-FPN", "RetinaNet R50-FPN"),
}


def make_batch(batch_size, height, width, num_boxes, seed=0):
    """Random images (uint8 range) with random ground-truth boxes, as a dataloader gives them."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(batch_size):
        xy = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([width, height]) * 0.7
        wh = (0.05 + 0.25 * torch.rand(num_boxes, 2, generator=gen)) * torch.tensor([width, height])
        inst = Instances(
            (height, width),
            gt_boxes=Boxes(torch.cat([xy, xy + wh], dim=1)),
            gt_classes=torch.randint(0, 80, (num_boxes,), generator=gen),
        )
        image = torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        items.append({"image": image.float(), "instances": inst})
    return items


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup, iters):
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def autocast(device, enabled, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def measure(model, args, amp_dtype):
    device = next(model.parameters()).device
    amp_modes = (False,) if args.no_amp else (False, True)
    results = {}
    model.eval()
    for batch_size in args.infer_batch:
        inputs = make_batch(batch_size, args.height, args.width, args.boxes)
        for amp in amp_modes:
            key = f"infer_b{batch_size}_{'amp' if amp else 'fp32'}_img_s"

            def infer():
                with torch.no_grad(), autocast(device, amp, amp_dtype):
                    model(inputs)

            results[key] = _try(
                lambda: batch_size / time_calls(infer, device, args.warmup, args.iters)
            )
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    inputs = make_batch(args.train_batch, args.height, args.width, args.boxes)
    for amp in amp_modes:
        key = f"train_b{args.train_batch}_{'amp' if amp else 'fp32'}_it_s"

        def step():
            with autocast(device, amp, amp_dtype):
                losses = model(inputs)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with EventStorage():
            results[key] = _try(lambda: 1.0 / time_calls(step, device, args.warmup, args.iters))
        if device.type == "cuda":
            results[key.replace("_it_s", "_peak_mem_gb")] = torch.cuda.max_memory_allocated() / 1e9
    return results


def _try(fn):
    try:
        return fn()
    except Exception as e:  # report, don't abort the other measurements
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def count_flops(model, height, width):
    """{"gflops", "deform_gflops"}: multiply-adds / 1e9 of one inference on a random
    ``height`` x ``width`` image, all and those of the deformable conv modules themselves."""
    image = make_batch(1, height, width, num_boxes=0)[0]["image"]
    analysis = FlopCountAnalysis(model.eval(), [{"image": image.to(_device())}])
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    deform = 0
    for name, module in model.named_modules():
        if isinstance(module, (DeformConv, ModulatedDeformConv)):
            own = by_module[f"model.{name}"]
            deform += own - sum(by_module.get(f"model.{name}.{c}", 0) for c in module._modules)
    return {"gflops": analysis.total() / 1e9, "deform_gflops": deform / 1e9}


def profile_inference(model, args, rows=15):
    """``torch.profiler``'s table of the operators of ``args.iters`` fp32 inferences (batch 1,
    after ``args.warmup``), the ``rows`` largest by self CPU time."""
    inputs = make_batch(1, args.height, args.width, args.boxes)
    model.eval()
    with torch.no_grad():
        for _ in range(args.warmup):
            model(inputs)
        with torch.profiler.profile() as prof:
            for _ in range(args.iters):
                model(inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def format_flops_table(all_flops):
    """A markdown table: GFLOPs per model, its deformable convs', and each model's GFLOPs over
    FCOS's and RetinaNet's where those were counted."""
    bases = [b for b in ("FCOS R50-FPN", "RetinaNet R50-FPN") if b in all_flops]
    lines = ["| model | GFLOPs | of which deformable convs | " + " | ".join(
        f"/ {b.split()[0]}" for b in bases) + " |"]
    lines.append("|" + " --- |" * (3 + len(bases)))
    for name, row in all_flops.items():
        ratios = [f"{row['gflops'] / all_flops[b]['gflops']:.3f}" for b in bases]
        lines.append(f"| {name} | {row['gflops']:.1f} | {row['deform_gflops']:.1f} | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines)


def format_table(all_results):
    """A markdown table: one row per metric, one column per model, then the ratios (``RATIOS``)
    whose two models were measured."""
    names = list(all_results)
    keys = [k for k in all_results[names[0]]]
    ratios = {col: pair for col, pair in RATIOS.items() if set(pair) <= set(names)}
    lines = ["| metric | " + " | ".join(names + list(ratios)) + " |"]
    lines.append("|" + " --- |" * (len(names) + len(ratios) + 1))
    for key in keys:
        values = [all_results[n].get(key) for n in names]
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in values]
        for numerator, denominator in ratios.values():
            top, bottom = all_results[numerator].get(key), all_results[denominator].get(key)
            ok = isinstance(top, float) and isinstance(bottom, float) and bottom > 0
            cells.append(f"{top / bottom:.2f}" if ok else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_throughput(all_results, path):
    """Save a bar chart at ``path``: inference images/s (left) and training iterations/s (right),
    one group of bars per measurement (batch size, fp32 / AMP), one bar per model; failed
    measurements have no bar. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(all_results)
    keys = list(all_results[names[0]])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for ax, unit, label in zip(axes, ("_img_s", "_it_s"), ("inference images/s", "training it/s")):
        group = [k for k in keys if k.endswith(unit)]
        for i, name in enumerate(names):
            values = [all_results[name].get(k) for k in group]
            xs = [x + i * width for x, v in enumerate(values) if isinstance(v, float)]
            ax.bar(xs, [v for v in values if isinstance(v, float)], width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(group))])
        ax.set_xticklabels([k[: -len(unit)] for k in group])
        ax.set_ylabel(label)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run (CI): 64 x 64 px, each mode once"
    )
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--infer-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=10, help="ground-truth boxes per image")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument(
        "--no-amp",
        action="store_true",
        help="fp32 only (on CPUs without bfloat16 arithmetic, e.g. AVX2, AMP takes many minutes)",
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument(
        "--plot", metavar="JSON", help="measure nothing: the table and chart of an --output JSON"
    )
    parser.add_argument(
        "--flops", action="store_true", help="time nothing: count each model's GFLOPs"
    )
    parser.add_argument(
        "--profile", action="store_true", help="time nothing: profile fp32 inference (batch 1)"
    )
    args = parser.parse_args(argv)
    if args.plot:
        all_results = json.loads(Path(args.plot).read_text())
        print(format_table(all_results))
        plot_throughput(all_results, Path(args.plot).with_suffix(".png"))
        return
    if args.smoke:
        args.height, args.width, args.infer_batch, args.train_batch = 64, 64, [1, 2], 2
        args.warmup, args.iters = 0, 1

    name = torch.cuda.get_device_name() if _device() == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, input {args.height} x {args.width}")
    if args.flops:
        all_flops = {}
        for model_name in args.models:
            torch.manual_seed(0)
            all_flops[model_name] = count_flops(MODELS[model_name](80), args.height, args.width)
            print(f"{model_name}: {json.dumps(all_flops[model_name])}", flush=True)
        print(format_flops_table(all_flops))
        return all_flops
    if args.profile:
        for model_name in args.models:
            torch.manual_seed(0)
            print(f"{model_name}:\n{profile_inference(MODELS[model_name](80), args)}", flush=True)
        return
    amp_dtype = getattr(torch, args.amp_dtype)
    all_results = {}
    for model_name in args.models:
        torch.manual_seed(0)
        model = MODELS[model_name](num_classes=80)
        all_results[model_name] = measure(model, args, amp_dtype)
        print(f"{model_name}: {json.dumps(all_results[model_name])}", flush=True)
        del model
    print(format_table(all_results))
    if args.output:
        Path(args.output).write_text(json.dumps(all_results, indent=2))
        try:
            plot_throughput(all_results, Path(args.output).with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed (pip install .[plots]): no chart")


if __name__ == "__main__":
    main()
