"""Pretrain promptalign's tiny CLIP ("tiny-shapes") on the synthetic image-caption world.

    python scripts/pretrain_tiny_clip.py --out src/promptalign/backbone/weights/tiny-shapes.safetensors

Contrastive (CLIP) training of the open_clip architecture ``pa-tiny-shapes`` (48 px ViT, 4 layers,
width 96; text transformer 3 layers, width 48; joint width 64) on a fixed pool of rendered
(image, caption) pairs, AdamW with cosine decay, fp32 on CPU, fixed seed and thread count. The
weights are saved as fp16 safetensors (the file promptalign ships). Re-running with the same
arguments, torch version and thread count reproduces the file bit-for-bit; across machines or
thread counts the float reduction order may differ (results then agree to training noise).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from promptalign import load_backbone
from promptalign.data.synthetic import caption_pairs

ARCH = "pa-tiny-shapes"
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pool", type=int, default=40000, help="rendered pairs in the training pool")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    bb = load_backbone(ARCH)  # random init; the wrapper gives the exactly truncated text forward
    model = bb.clip
    for param in model.parameters():
        param.requires_grad_(True)
    tok = bb.tokenizer
    images, captions = caption_pairs(args.seed, 0, args.pool)
    pool = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 [P, 3, H, W]
    texts = tok(captions)
    print(f"rendered {args.pool} pairs in {time.time() - t0:.0f} s", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    for step in range(args.steps):
        lr = args.lr * (step + 1) / warmup if step < warmup else \
            args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, args.pool, (args.batch,), generator=g)
        x = (pool[idx].float() / 255 - MEAN) / STD
        t = texts[idx]
        img = F.normalize(bb.encode_image(x), dim=-1)
        txt = F.normalize(bb.encode_text(t), dim=-1)  # runs only up to the longest EOT
        logits = model.logit_scale.exp() * img @ txt.t()
        target = torch.arange(args.batch)
        # captions repeat in the pool: identical captions are not negatives of each other
        same = (t.unsqueeze(1) == t.unsqueeze(0)).all(-1) & ~torch.eye(args.batch, dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == target).float().mean().item()
            print(f"step {step} loss {loss.item():.3f} acc {acc:.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in vars(args).items() if k != "out"}
    meta.update(torch=torch.__version__)  # no timings: the file must be reproducible byte for byte
    save_file(sd, str(out), metadata={"promptalign_pretrain": json.dumps(meta)})
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
