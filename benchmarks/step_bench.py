"""Training-step time per image for every registered method, eager and (optionally) compiled.

Prints one JSON line: for each method of ``promptalign.list_methods()``, milliseconds per image of
one optimiser step (forward, backward, SGD update) at the method's published batch size on K
classes, measured in the same process (ratios are comparable on a noisy machine).

    python benchmarks/step_bench.py                         # GPU: random ViT-B/16, K = 100, fp16
    python benchmarks/step_bench.py --compile               # + compiled steps (promptalign.accel)
    python benchmarks/step_bench.py --compile --compile-mode reduce-overhead   # + CUDA graphs
    python benchmarks/step_bench.py --device cpu            # tiny random CLIP, K = 10

Prompt depths larger than the backbone are clamped to its layers, by config field (never by
method name). Methods without trainable parameters (zero-shot CLIP) are listed with a reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import promptalign
from promptalign.accel import compile_step
from promptalign.registry import METHODS

DEPTH_FIELDS = ("depth", "text_depth", "vision_depth")


def fitted_overrides(name: str, layers: int) -> dict:
    """Clamp every prompt-depth field (and those of a wrapped base method) to ``layers``."""
    fields = {f.name: f for f in dataclasses.fields(METHODS.get(name).config_class)}
    out = {
        k: min(fields[k].default, layers)
        for k in DEPTH_FIELDS
        if k in fields and isinstance(fields[k].default, int)
    }
    if "base_options" in fields and "base" in fields:
        base = METHODS.get(fields["base"].default).config_class
        out["base_options"] = {
            f.name: min(f.default, layers)
            for f in dataclasses.fields(base)
            if f.name in DEPTH_FIELDS and isinstance(f.default, int)
        }
    return out


class _Step(torch.nn.Module):
    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, labels):
        return self.method.training_step((images, labels))["loss"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(step, x, y, opt, scaler, ctx, steps, device) -> tuple[float, float]:
    """(warm-up seconds, median ms per optimiser step)."""

    def one():
        with ctx():
            loss = step(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (compilation, caches, autotuning)
        one()
    _sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        _sync(device)
        times.append(time.perf_counter() - t)
    return warm, statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default=None, help="default ViT-B-16 on CUDA, pa-tiny-vit on CPU")
    p.add_argument("--classes", type=int, default=None, help="default 100 on CUDA, 10 on CPU")
    p.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16"],
        default=None,
        help="default fp16 on CUDA, none on CPU",
    )
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 2 CPU)")
    p.add_argument("--compile", action="store_true", help="also time the compiled step")
    p.add_argument(
        "--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead"'
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    arch = args.arch or ("ViT-B-16" if gpu else "pa-tiny-vit")
    amp = args.amp or ("fp16" if gpu else "none")
    K = args.classes or (100 if gpu else 10)
    steps = args.steps or (10 if gpu else 2)
    bb = promptalign.load_backbone(arch, device=device)
    layers = min(bb.vision_layers, bb.text_layers)
    size = bb.preprocess.image_size
    result: dict = {
        "bench": "train_step_ms_per_image",
        "device": torch.cuda.get_device_name(device)
        if gpu
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "arch": arch,
        "amp": amp,
        "K": K,
        "compile_mode": args.compile_mode if args.compile else None,
    }
    classes = [f"class {i}" for i in range(K)]
    g = torch.Generator().manual_seed(args.seed)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16

    def ctx():
        return torch.autocast(device.type, dtype=dtype, enabled=amp != "none")

    registered = promptalign.list_methods()  # also imports every method file
    for name in args.methods or registered:
        torch.manual_seed(args.seed)
        method = promptalign.create_method(name, bb, classes, **fitted_overrides(name, layers))
        method = method.to(device).train()
        params = method.trainable_parameters()
        if not params:
            result[name] = {"skipped": "no trainable parameters"}
            continue
        batch = method.optim_preset.batch_size
        x = torch.randn(batch, 3, *size, generator=g).to(device)
        y = (torch.arange(batch) % K).to(device)
        opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        entry = {"batch": batch}
        variants = {"eager": _Step(method)}
        if args.compile:
            variants["compiled"] = compile_step(
                _Step(method), "on", device=device, compile_mode=args.compile_mode
            )
        for label, step in variants.items():
            warm, ms = _time_step(step, x, y, opt, scaler, ctx, steps, device)
            entry[f"{label}_warmup_s"] = warm
            entry[f"{label}_ms_per_step"] = ms
            entry[f"{label}_ms_per_image"] = ms / batch
        if "compiled_ms_per_step" in entry:
            entry["compiled_speedup"] = entry["eager_ms_per_step"] / entry["compiled_ms_per_step"]
        result[name] = entry
        del method, opt
    print(json.dumps(result))


if __name__ == "__main__":
    main()
