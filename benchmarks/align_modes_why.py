"""Why ALIGN's prompt sets do not separate on the synthetic world: the measurements.

``benchmarks/align_modes.py`` shows the table (plan entropies, set distances per M, schedule and
initialisation); this script measures the candidate causes, on an untrained method (``init``) or
on a trained run folder (``run``), each as one JSON line:

* **how the sets start** (``init``): the mean pairwise cosine distance between the M visual sets'
  global image features and between the N text sets' class features, for the released
  initialisation (set 0 from "a photo of a", the others N(0, 0.02)) and for one phrase per set;
  on the shipped ``tiny-shapes-v3`` and on a randomly initialised ViT-B/16 (the published
  backbone's shapes: 12 layers, 196 patches, depth-9 prompts; no pretrained weights offline);
* **the prompt-level cost** on base test images: its spread over the M x N pairs and its
  *interaction* part ``R = C - row means - column means + mean``. Only R moves an entropic plan
  away from uniform (an additive cost ``a_m + b_n`` gives every plan with these marginals the
  same cost, so Sinkhorn returns the uniform one), and it does so in proportion to ``R / eps``;
* **the plan at other prompt-level eps** on the same costs (the trained features held fixed):
  its entropy ratio to uniform for eps in ``--eps``;
* **whether bigger visual prompts move the sets further apart** (``init``): the image-set
  distance with every visual prompt token multiplied by each of ``--scales`` (they reach the
  other tokens only through attention over layer-normalised tokens, so only their direction
  can matter: measured, the distance does not change);
* **the gradient per set** on a training batch: the gradient of the cross-entropy with respect
  to each visual set's prompt tokens (all layers) and each text set's context, their norms and
  the mean pairwise cosine between sets (1 = every set is pushed the same way, so their
  differences never grow), at the run's eps and at each ``--eps``.

    python benchmarks/align_modes_why.py init --arch tiny-shapes-v3 --data-root bench-data
    python benchmarks/align_modes_why.py init --arch ViT-B-16 --images 8 --data-root bench-data
    python benchmarks/align_modes_why.py run bench-modes/base2new/jobs/.../run --eps 0.1 0.01 0.001
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

import promptalign
from promptalign.data import build_transform, load_dataset
from promptalign.engine import load_run
from promptalign.explain import mean_pairwise_distance
from promptalign.methods import create_method
from promptalign.methods.explainable import plan_entropy_ratio

PHRASES = "\t".join(("a photo of a", "a nice photo of", "a large picture of", "a small photo of a"))


def _batch(data, preprocess, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images spread evenly over a split (every class; the evaluation transform, no random
    crop) and their labels."""
    from PIL import Image

    tf = build_transform(preprocess, train=False)
    records = data.test if split == "test" else data.train
    records = [records[round(i * (len(records) - 1) / max(n - 1, 1))] for i in range(n)]
    xs = []
    for r in records:
        with Image.open(data.image_root / r.path) as im:
            xs.append(tf(im.convert("RGB")))
    return torch.stack(xs), torch.tensor([r.label for r in records])


def cost_stats(method, images: torch.Tensor, eps_list) -> dict:
    """Prompt-level cost spread and interaction part, and the plan entropy at each eps, over
    ``images`` and every class (the method's own features, fixed)."""
    with torch.no_grad():
        feats = method.explain_features(images)
        K = feats.text_global.shape[0]
        res = feats.head.plans(feats, torch.arange(K))
    C = res["cost"].double()  # [B, K, M, N]
    R = C - C.mean(-1, keepdim=True) - C.mean(-2, keepdim=True) + C.mean((-2, -1), keepdim=True)
    out = {
        "cost_range": float((C.amax((-2, -1)) - C.amin((-2, -1))).mean()),
        "cost_row_range": float((C.mean(-1).amax(-1) - C.mean(-1).amin(-1)).mean()),
        "cost_col_range": float((C.mean(-2).amax(-1) - C.mean(-2).amin(-1)).mean()),
        "interaction_max": float(R.abs().amax((-2, -1)).mean()),
        "interaction_std": float(R.std((-2, -1)).mean()) if R.shape[-1] * R.shape[-2] > 1 else 0,
        "plan_entropy": float(plan_entropy_ratio(res["plan"]).mean()),
        "image_distance": float(mean_pairwise_distance(feats.image_global).mean()),
        "text_distance": float(mean_pairwise_distance(feats.text_global).mean()),
    }
    prompt = method.head.solver.prompt
    for eps in eps_list:
        plan = dataclasses.replace(prompt, eps=eps, domain="log").solve(C.float()).plan
        out[f"plan_entropy_eps{eps:g}"] = float(plan_entropy_ratio(plan).mean())
    return out


def _pairwise_cos(g: torch.Tensor) -> float:
    """Mean cosine between the rows of ``g [S, P]`` (S >= 2)."""
    z = F.normalize(g.double(), dim=-1)
    c = z @ z.t()
    S = g.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (S * (S - 1)))


def set_gradients(method, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Gradient of the cross-entropy per visual set (its prompt tokens in every layer) and per text
    set (its context in every layer), the visual and text paths kept apart."""
    method.train()
    prompts = method.prompts
    vis, vdeep = prompts.visual()
    leaves = [vis.detach().requires_grad_()] + [d.detach().requires_grad_() for d in vdeep]
    prompts.visual = lambda: (leaves[0], leaves[1:])  # the visual path ends at these leaves
    try:
        method.zero_grad(set_to_none=True)
        loss = F.cross_entropy(method(images).logits, labels)
        loss.backward()
    finally:
        prompts.__dict__.pop("visual", None)  # the method's own again
    g_vis = torch.cat([x.grad.flatten(1) for x in leaves], 1)  # [M, P]
    g_txt = torch.cat(
        [prompts.ctx.grad.flatten(1), prompts.deep_ctx.grad.transpose(0, 1).flatten(1)], 1
    )  # [N, P']
    method.eval()
    out = {
        "loss": float(loss.detach()),
        "visual_grad_norms": [float(x) for x in g_vis.norm(dim=1)],
        "text_grad_norms": [float(x) for x in g_txt.norm(dim=1)],
    }
    if g_vis.shape[0] > 1:
        mean = g_vis.mean(0, keepdim=True)
        out["visual_grad_cos"] = _pairwise_cos(g_vis)
        out["visual_grad_spread"] = float((g_vis - mean).norm(dim=1).mean() / mean.norm())
        out["text_grad_cos"] = _pairwise_cos(g_txt)
    return out


def prompt_reach(method, images: torch.Tensor, scales) -> dict:
    """How far the visual prompts can move the sets apart: the image-set distance with every
    visual prompt token (all layers) multiplied by each of ``scales`` (1 = as initialised)."""
    prompts = method.prompts
    vis, vdeep = prompts.visual()
    out = {}
    try:
        for scale in scales:
            scaled = (vis.detach() * scale, [d.detach() * scale for d in vdeep])
            prompts.visual = lambda scaled=scaled: scaled
            with torch.no_grad():
                g = method.explain_features(images).image_global
            out[f"image_distance_x{scale:g}"] = float(mean_pairwise_distance(g).mean())
    finally:
        prompts.__dict__.pop("visual", None)
    return out


def _with_eps(method, eps: float):
    """The method scoring with prompt-level ``eps`` (token level unchanged)."""
    from promptalign.methods.heads import HierarchicalOTHead

    solver = method.head.solver
    prompt = dataclasses.replace(solver.prompt, eps=eps, domain="log")
    method.head = HierarchicalOTHead(dataclasses.replace(solver, prompt=prompt))
    method.clear_cache()
    return method


def cmd_init(a) -> list[dict]:
    bb = promptalign.load_backbone(a.arch)
    data = load_dataset("synthetic_colour_shapes", a.data_root, shots=16, seed=1, subsample="base")
    x, _ = _batch(data, bb.preprocess, a.images)
    xt, yt = _batch(data, bb.preprocess, a.images, split="train")
    rows = []
    for init, ctx_init in (("released", "a photo of a"), ("phrases", PHRASES)):
        for seed in a.seeds:
            torch.manual_seed(seed)
            m = create_method(
                "align", bb, data.classnames, n_sets=a.sets, ctx_init=ctx_init, backend="torch"
            ).eval()
            row = {"what": "init", "arch": a.arch, "init": init, "seed": seed, "sets": a.sets}
            row |= {"depth": m.prompts.depth, "patches": bb.n_patches, "images": len(x)}
            row |= cost_stats(m, x, a.eps)
            row |= prompt_reach(m, x, a.scales)
            if a.grad:
                row["grad"] = {f"eps{m.config.eps:g}": set_gradients(m, xt, yt)}
            rows.append(row)
    return rows


def cmd_run(a) -> list[dict]:
    method, cfg, _ = load_run(a.run, device="cpu")
    d = cfg.data
    base = load_dataset(d.dataset, d.root, shots=d.shots, seed=cfg.run.seed, subsample="base")
    method.set_classnames(base.classnames)
    x, _ = _batch(base, method.backbone.preprocess, a.images)
    opts = method.config
    row = {"what": "run", "run": str(a.run), "sets": opts.n_sets, "eps": opts.eps}
    row |= {"ctx_init": opts.ctx_init, "epochs": cfg.optim.epochs}
    row |= cost_stats(method, x, a.eps)
    xt, yt = _batch(base, method.backbone.preprocess, a.images, split="train")
    row["grad"] = {f"eps{opts.eps:g}": set_gradients(method, xt, yt)}
    for eps in a.eps:
        if eps != opts.eps:
            row["grad"][f"eps{eps:g}"] = set_gradients(_with_eps(method, eps), xt, yt)
    return [row]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("init", help="untrained ALIGN on a backbone")
    pi.add_argument("--arch", default="tiny-shapes-v3")
    pi.add_argument("--sets", type=int, default=4)
    pi.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    pi.add_argument("--grad", action="store_true", help="also the gradient per set")
    pi.add_argument(
        "--scales", type=float, nargs="+", default=[0, 0.1, 1, 10, 100], help="visual prompt scales"
    )
    pr = sub.add_parser("run", help="a trained ALIGN run folder")
    pr.add_argument("run")
    for q in (pi, pr):
        q.add_argument("--data-root", default="bench-data")
        q.add_argument("--images", type=int, default=32, help="images measured")
        q.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.003, 0.001])
        q.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = cmd_init(a) if a.cmd == "init" else cmd_run(a)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
