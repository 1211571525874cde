"""Linear-probe reference for a few-shot table: how far frozen image features alone can go.

Prompt methods that only change the text side (CoOp and friends) are linear classifiers on the
frozen image features whose weights must come out of the text encoder. A logistic-regression probe
on the same features (L-BFGS, L2 penalty chosen from a small grid on the few-shot validation split)
shows how much of the gap to zero-shot is the features' limit and how much is the prompts'.
Prints one JSON line per (shots, seed).

    python benchmarks/linear_probe.py --dataset synthetic_colour_shapes --data-root bench-data \
        --arch tiny-shapes --shots 1 2 4 8 16 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import promptalign
from promptalign.data import ImageDataset, build_transform, load_dataset, make_loader

PENALTIES = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


@torch.no_grad()
def _features(bb, ds, records, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    images = ImageDataset(
        ds.name, ds.image_root, records, build_transform(bb.preprocess, train=False)
    )
    feats, labels = [], []
    for b in make_loader(images, batch, train=False):
        feats.append(F.normalize(bb.encode_image(b["image"]).float(), dim=-1))
        labels.append(b["label"])
    return torch.cat(feats), torch.cat(labels)


def _fit(
    x: torch.Tensor, y: torch.Tensor, k: int, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + penalty * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _acc(x, y, w, b) -> float:
    return 100.0 * (x @ w + b).argmax(1).eq(y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic_colour_shapes")
    p.add_argument("--data-root", required=True)
    p.add_argument("--arch", default="tiny-shapes")
    p.add_argument("--weights", default=None)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = p.parse_args()
    torch.manual_seed(0)
    bb = promptalign.load_backbone(a.arch, a.weights)
    test = None
    for shots in a.shots:
        for seed in a.seeds:
            ds = load_dataset(a.dataset, a.data_root, shots=shots, seed=seed)
            if test is None:
                test = _features(bb, ds, ds.test)
            xtr, ytr = _features(bb, ds, ds.train)
            xva, yva = _features(bb, ds, ds.val)
            scores = {
                pen: _acc(xva, yva, *_fit(xtr, ytr, ds.num_classes, pen)) for pen in PENALTIES
            }
            best = max(PENALTIES, key=lambda pen: (scores[pen], pen))
            w, b = _fit(xtr, ytr, ds.num_classes, best)
            print(
                json.dumps(
                    {
                        "dataset": a.dataset,
                        "arch": a.arch,
                        "shots": shots,
                        "seed": seed,
                        "penalty": best,
                        "val_accuracy": round(scores[best], 2),
                        "train_accuracy": round(_acc(xtr, ytr, w, b), 2),
                        "test_accuracy": round(_acc(*test, w, b), 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
