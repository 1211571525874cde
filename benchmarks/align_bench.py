"""ALIGN end to end: train step, evaluation, ImageNet extrapolation and token-level OT alone.

Prints one JSON line. Every comparison (torch vs fused token-level backend, paper vs released
form) is measured in the same process, so the ratios hold on a noisy machine.

    python benchmarks/align_bench.py                  # GPU: random ViT-B/16, the issue's sizes
    python benchmarks/align_bench.py --amp fp16       # (default on CUDA: fp16 autocast)
    python benchmarks/align_bench.py --device cpu     # CPU-sized defaults, about a minute

GPU defaults (issue 15): B = 4 train steps at K = 50 / 500 / 1000, evaluation of 64 images x 1000
classes (class features cached, as the evaluator does), ImageNet 50k x 1000 extrapolated from it,
the evaluation loader's images/s (decode + resize of 500 x 375 JPEGs) beside the model's,
token-level OT alone on 64 x 1000 with L = 12 and fp16 features. CPU defaults: the tiny random
CLIP ("pa-tiny-vit"), K = 10 / 50 / 100, 16 images x 100 classes, token OT at B = 4, K = 20 with
ViT-B/16 token shapes; the fused kernel needs CUDA, so CPU runs time the torch path only.
Peak memory is measured on CUDA (``max_memory_allocated`` above the model's own memory); for the
fused path's K = 1000 train step an estimate of the kept plans is printed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import promptalign
from promptalign.ot import fused, hierarchical_ot


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeat: int) -> float:
    fn()  # warm-up (Triton compilation, caches)
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _amp(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _peak(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 1e9


def fused_plan_bytes(B, M, N, J, K, L) -> int:
    """Bytes the fused path keeps for the backward: the fp32 plans, one entry per token pair."""
    return B * M * J * K * N * L * fused.BYTES_PER_ENTRY


def loader_images_per_s(pre, n: int, workers: int, batch: int) -> float:
    """Decode + resize throughput of the evaluation loader on ImageNet-sized JPEGs (500 x 375)."""
    from PIL import Image

    from promptalign.data.base import Record
    from promptalign.data.loader import ImageDataset, make_loader
    from promptalign.data.transforms import build_transform

    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        for i in range(n):
            px = (torch.rand(375, 500, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(Path(root) / f"{i}.jpg", quality=90)
        records = [Record(f"{i}.jpg", 0, "x") for i in range(n)]
        data = ImageDataset("bench", Path(root), records, build_transform(pre, train=False))
        loader = make_loader(data, batch, train=False, workers=workers)
        t = time.perf_counter()
        seen = sum(len(b["label"]) for b in loader)
        return seen / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default=None, help="default ViT-B-16 on CUDA, pa-tiny-vit on CPU")
    p.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16"],
        default=None,
        help="autocast dtype; default fp16 on CUDA, none on CPU",
    )
    p.add_argument("--train-classes", type=int, nargs="+", default=None)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--eval-classes", type=int, default=None)
    p.add_argument("--ot-images", type=int, default=None)
    p.add_argument("--ot-classes", type=int, default=None)
    p.add_argument(
        "--ot-l", type=int, default=12, help="text tokens per prompt in the OT-alone run"
    )
    p.add_argument("--sets", type=int, default=4, help="M = N")
    p.add_argument("--imagenet-images", type=int, default=50_000)
    p.add_argument("--loader-images", type=int, default=None, help="default 512 GPU, 64 CPU")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    arch = args.arch or ("ViT-B-16" if gpu else "pa-tiny-vit")
    amp = args.amp or ("fp16" if gpu else "none")
    train_ks = args.train_classes or ([50, 500, 1000] if gpu else [10, 50, 100])
    eval_b = args.eval_images or (64 if gpu else 16)
    eval_k = args.eval_classes or (1000 if gpu else 100)
    ot_b = args.ot_images or (64 if gpu else 4)
    ot_k = args.ot_classes or (1000 if gpu else 20)
    backends = ["torch"] + (["fused"] if gpu and fused.available() else [])
    forms = ["paper", "released"]
    torch.manual_seed(args.seed)

    bb = promptalign.load_backbone(arch, device=device)
    depth = min(9, bb.vision_layers, bb.text_layers)
    size = bb.preprocess.image_size
    result: dict = {
        "bench": "align",
        "device": torch.cuda.get_device_name(device)
        if gpu
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "arch": arch,
        "amp": amp,
        "M": args.sets,
        "N": args.sets,
        "depth": depth,
        "train_batch": args.train_batch,
    }

    def method_for(k: int, form: str, backend: str):
        m = promptalign.create_method(
            "align",
            bb,
            [f"class {i}" for i in range(k)],
            preset="reference" if form == "released" else None,
            n_sets=args.sets,
            depth=depth,
            backend=backend,
        )
        return m.to(device)

    g = torch.Generator().manual_seed(args.seed)

    def images(n):
        return torch.randn(n, 3, *size, generator=g).to(device)

    # ---- train steps: forward + backward of the full method (text tower included)
    for k in train_ks:
        x = images(args.train_batch)
        y = torch.arange(args.train_batch, device=device) % k
        for form in forms:
            for be in backends:
                m = method_for(k, form, be)
                m.train()

                def step(m=m, x=x, y=y):
                    with _amp(device, amp):
                        loss = m.training_step((x, y))["loss"]
                    loss.backward()
                    m.zero_grad(set_to_none=True)

                key = f"train_K{k}_{form}_{be}"
                result[f"{key}_s"] = _time(step, device, args.repeat)
                result[f"{key}_peak_gb"] = _peak(device, step)
                del m
        L = 12  # ViT-B/16 class prompts of ALIGN: ~8-16 tokens
        result[f"train_K{k}_fused_plans_gb_vitb16_L12"] = (
            fused_plan_bytes(args.train_batch, args.sets, args.sets, 198, k, L) / 1e9
        )

    # ---- evaluation: method.logits with class features cached (as the evaluator does)
    x = images(eval_b)
    for form in forms:
        for be in backends:
            m = method_for(eval_k, form, be).eval()

            def ev(m=m, x=x):
                with torch.no_grad(), _amp(device, amp):
                    m.logits(x)

            key = f"eval_{eval_b}x{eval_k}_{form}_{be}"
            t = _time(ev, device, args.repeat)
            result[f"{key}_s"] = t
            result[f"{key}_imagenet_min"] = t / eval_b * args.imagenet_images * (1000 / eval_k) / 60
            result[f"{key}_images_per_s"] = eval_b / t
            del m
    result["loader_workers"] = args.workers
    result["loader_images_per_s"] = loader_images_per_s(
        bb.preprocess, args.loader_images or (512 if gpu else 64), args.workers, eval_b
    )

    # ---- token-level OT alone: synthetic features with ViT-B/16 shapes, fp16 / fp32 features
    J, D, L, M = 198, 512, args.ot_l, args.sets
    dt = torch.float16 if gpu else torch.float32

    def mk(*s):
        return F.normalize(torch.randn(*s, generator=g), dim=-1).to(device, dt)

    feats = (mk(ot_b, M, D), mk(ot_b, M, J, D), mk(ot_k, M, D), mk(ot_k, M, L, D))
    lengths = torch.randint(max(1, L // 2), L + 1, (ot_k, M), generator=g).to(device)
    for form in forms:
        for be in backends:
            kw = {
                "text_lengths": lengths,
                "form": form,
                "backend": be,
                "tol": 1e-3,
                "max_iter": 100,
            }
            with torch.no_grad():
                t = _time(lambda kw=kw: hierarchical_ot(*feats, **kw), device, args.repeat)
                res = hierarchical_ot(*feats, **kw)
            key = f"ot_{ot_b}x{ot_k}_L{L}_{form}_{be}"
            result[f"{key}_s"] = t
            result[f"{key}_token_mean_iter"] = round(res.token_stats.mean_iter.item(), 2)
            result[f"{key}_peak_gb"] = (
                _peak(device, lambda kw=kw: hierarchical_ot(*feats, **kw)) if gpu else None
            )
    if "fused" in backends:
        for name in [k[: -len("_torch_s")] for k in result if k.endswith("_torch_s")]:
            result[f"{name}_torch_over_fused"] = (
                result[f"{name}_torch_s"] / result[f"{name}_fused_s"]
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
