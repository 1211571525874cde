"""Pretrain promptalign's tiny CLIP ("tiny-shapes") on the synthetic image-caption world.

    python scripts/pretrain_tiny_clip.py \\
        --out src/promptalign/backbone/weights/tiny-shapes.safetensors

Contrastive (CLIP) training of the open_clip architecture ``pa-tiny-shapes`` (48 px ViT, 4 layers,
width 96; text transformer 3 layers, width 48; joint width 64) on a fixed pool of rendered
(image, caption) pairs, AdamW with cosine decay, fp32 on CPU, fixed seed and thread count. The
weights are saved as fp16 safetensors (the file promptalign ships). Re-running with the same
arguments, torch version and thread count reproduces the file bit-for-bit; across machines or
thread counts the float reduction order may differ (results then agree to training noise).

The architecture and the caption distribution can be changed by flags (defaults: the shipped
model). With any architecture flag the script also writes the open_clip config next to the
weights (``OUT`` with ``.json``), so ``load_backbone("OUT.json", "OUT")`` loads the result:

    python scripts/pretrain_tiny_clip.py --out /tmp/t6x128.safetensors --captions rich \
        --text-layers 6 --text-width 128 --text-heads 4

``--init-image FILE --lock-image`` starts the image tower from a trained model's and keeps it
frozen, training only the text side against it (locked-image tuning, Zhai et al., "LiT: Zero-Shot
Transfer with Locked-image text Tuning", CVPR 2022, arXiv 2111.07991): the image features of the
fixed pool are then computed once, and a step costs only the text tower.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from promptalign import load_backbone
from promptalign.backbone.loading import read_state_dict, resolve_arch
from promptalign.data.captions import CAPTION_MODES, caption_pairs

ARCH = "pa-tiny-shapes"
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
# flags added after the shipped model; they enter the file's metadata only when not at their
# default, so the default command still writes the shipped bytes
ARCH_FLAGS = {
    "text_layers": ("text_cfg", "layers"),
    "text_width": ("text_cfg", "width"),
    "text_heads": ("text_cfg", "heads"),
    "vision_layers": ("vision_cfg", "layers"),
    "vision_width": ("vision_cfg", "width"),
    "vision_patch": ("vision_cfg", "patch_size"),
    "embed_dim": (None, "embed_dim"),
}
NEW_DEFAULTS = {
    **{k: None for k in ARCH_FLAGS},
    "captions": "plain",
    "init_image": None,
    "lock_image": False,
}


def model_config(args: argparse.Namespace) -> dict | None:
    """The open_clip config the flags ask for, or None for the shipped architecture unchanged."""
    if all(getattr(args, k) is None for k in ARCH_FLAGS):
        return None
    _, cfg, _ = resolve_arch(ARCH)
    for flag, (tower, key) in ARCH_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            (cfg[tower] if tower else cfg)[key] = value
    if cfg["text_cfg"]["width"] % cfg["text_cfg"]["heads"]:
        raise SystemExit(
            f"--text-width {cfg['text_cfg']['width']} is not divisible by --text-heads "
            f"{cfg['text_cfg']['heads']}; choose a width that is a multiple of the heads"
        )
    vis = cfg["vision_cfg"]
    if vis["image_size"] % vis["patch_size"]:
        raise SystemExit(
            f"--vision-patch {vis['patch_size']} does not divide the {vis['image_size']} px image; "
            "choose a divisor such as 4, 6, 8 or 12"
        )
    return cfg


def init_image_tower(model: torch.nn.Module, path: str) -> None:
    """Copy the image tower (``visual.*``) of the weights file ``path`` into ``model``."""
    sd = {k: v for k, v in read_state_dict(path).items() if k.startswith("visual.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if bad:
        raise SystemExit(
            f"--init-image {path}: its image tower does not match this architecture "
            f"({bad[:5]}); use the same --vision-* flags as the model that wrote it"
        )
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in sd:
                v.copy_(sd[k].to(v.dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pool", type=int, default=40000, help="rendered pairs in the training pool")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--captions",
        choices=CAPTION_MODES,
        default="plain",
        help="caption distribution of the pool (see promptalign.data.captions.caption_pairs)",
    )
    p.add_argument(
        "--text-layers", type=int, default=None, help="text transformer depth (shipped: 3)"
    )
    p.add_argument(
        "--text-width", type=int, default=None, help="text transformer width (shipped: 48)"
    )
    p.add_argument("--text-heads", type=int, default=None, help="text attention heads (shipped: 4)")
    p.add_argument("--vision-layers", type=int, default=None, help="ViT depth (shipped: 4)")
    p.add_argument("--vision-width", type=int, default=None, help="ViT width (shipped: 96)")
    p.add_argument(
        "--vision-patch",
        type=int,
        default=None,
        help="ViT patch size in pixels; must divide the 48 px image (shipped: 8, 36 patches)",
    )
    p.add_argument(
        "--embed-dim", type=int, default=None, help="joint embedding width (shipped: 64)"
    )
    p.add_argument(
        "--init-image", default=None, help="weights file whose image tower starts training"
    )
    p.add_argument("--lock-image", action="store_true", help="keep the image tower frozen (LiT)")
    args = p.parse_args()
    if args.lock_image and not args.init_image:
        raise SystemExit(
            "--lock-image needs --init-image FILE (a frozen random image tower learns nothing)"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = model_config(args)
    # random init; the wrapper gives the exactly truncated text forward
    bb = load_backbone(ARCH if cfg is None else cfg)
    model = bb.clip
    if args.init_image:
        init_image_tower(model, args.init_image)
    for n, param in model.named_parameters():
        param.requires_grad_(not (args.lock_image and n.startswith("visual.")))
    tok = bb.tokenizer
    if args.captions == "plain":
        images, captions = caption_pairs(args.seed, 0, args.pool)
    else:
        images, captions = caption_pairs(args.seed, 0, args.pool, mode=args.captions)
    pool = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 [P, 3, H, W]
    texts = tok(captions)
    print(f"rendered {args.pool} pairs in {time.time() - t0:.0f} s", flush=True)
    locked = None
    if args.lock_image:  # the frozen tower's features of the fixed pool, computed once
        with torch.no_grad():
            locked = torch.cat(
                [
                    F.normalize(
                        bb.encode_image((pool[i : i + 500].float() / 255 - MEAN) / STD), dim=-1
                    )
                    for i in range(0, args.pool, 500)
                ]
            )  # [P, D]
        print(
            f"encoded the pool with the locked image tower in {time.time() - t0:.0f} s", flush=True
        )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    g = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    for step in range(args.steps):
        lr = (
            args.lr * (step + 1) / warmup
            if step < warmup
            else args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, args.pool, (args.batch,), generator=g)
        t = texts[idx]
        if locked is None:
            x = (pool[idx].float() / 255 - MEAN) / STD
            img = F.normalize(bb.encode_image(x), dim=-1)
        else:
            img = locked[idx]
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
            print(
                f"step {step} loss {loss.item():.3f} acc {acc:.3f} lr {lr:.2e} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    meta = {
        k: str(v)
        for k, v in vars(args).items()
        if k != "out" and (k not in NEW_DEFAULTS or NEW_DEFAULTS[k] != v)
    }
    if args.init_image:
        meta["init_image"] = Path(args.init_image).name
    meta.update(torch=torch.__version__)  # no timings: the file must be reproducible byte for byte
    save_file(sd, str(out), metadata={"promptalign_pretrain": json.dumps(meta)})
    if cfg is not None:
        out.with_suffix(".json").write_text(json.dumps(cfg, indent=4) + "\n")
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
