"""Two versions of ``promptalign.ot`` in one process: ALIGN train step (fwd + bwd) and eval forward.

``promptalign.ot`` imports nothing else from the package, so two source trees can be loaded side
by side and timed alternately (ratios hold on a noisy machine). Prints one JSON line.

    git archive 062d1da src | tar -x -C /tmp/base
    python benchmarks/ot_compare_trees.py --old /tmp/base/src --new src --classes 50
    python benchmarks/ot_compare_trees.py --old /tmp/base/src --new src --device cuda --classes 500
    # ALIGN on the shipped tiny-shapes-v3 (64 patches + 2 prompt tokens, width 64), the demo's
    # training batch and its evaluation batch, on a CPU
    python benchmarks/ot_compare_trees.py --old /tmp/base/src --new src --images 32 \
        --eval-images 256 --classes 24 --j 66 --d 64 --l 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def load(name: str, src: str):
    path = Path(src) / "promptalign" / "ot"
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="source root (the folder holding promptalign/)")
    p.add_argument("--new", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4, help="images per training step")
    p.add_argument("--eval-images", type=int, default=None, help="default: --images")
    p.add_argument("--j", type=int, default=198, help="image tokens (ViT-B/16: 196 + 2 prompts)")
    p.add_argument("--d", type=int, default=512, help="feature width")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--l", type=int, default=12)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    mods = {"old": load("ot_old", args.old), "new": load("ot_new", args.new)}
    g = torch.Generator().manual_seed(0)
    B, M, J, D, K, N, L = args.images, 4, args.j, args.d, args.classes, 4, args.l
    Be = args.eval_images or B

    def features(b):
        return [
            torch.randn(*s, generator=g).to(device, dtype)
            for s in [(b, M, D), (b, M, J, D), (K, N, D), (K, N, L, D)]
        ]

    feats, eval_feats = features(B), features(Be)
    lengths = torch.randint(max(1, L // 2), L + 1, (K, N), generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train(mod):
        fs = [f.clone().requires_grad_(True) for f in feats]
        mod.hierarchical_ot(
            *fs, text_lengths=lengths, tol=1e-3, max_iter=100
        ).score.sum().backward()

    def ev(mod):
        with torch.no_grad():
            return mod.hierarchical_ot(
                *eval_feats, text_lengths=lengths, tol=1e-3, max_iter=100
            ).score

    out = {"device": args.device, "B": B, "B_eval": Be, "K": K, "J": J, "D": D, "L": L}
    out["dtype"] = args.dtype
    for what, fn in (("train", train), ("eval", ev)):
        times = {"old": [], "new": []}
        for mod in mods.values():
            fn(mod)  # warm-up
        for _ in range(args.repeat):
            for name, mod in mods.items():
                sync()
                t = time.perf_counter()
                fn(mod)
                sync()
                times[name].append(time.perf_counter() - t)
        for name in mods:
            out[f"{what}_{name}_s"] = statistics.median(times[name])
        out[f"{what}_new_over_old"] = out[f"{what}_new_s"] / out[f"{what}_old_s"]
    out["score_max_diff"] = (ev(mods["old"]) - ev(mods["new"])).abs().max().item()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
