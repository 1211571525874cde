"""Checks of the fused token-OT kernel against the torch path, run by tests/test_ot_fused.py.

Run as a script with TRITON_INTERPRET=1 (the interpreter must be chosen before Triton is imported,
hence a separate process) or on a CUDA device (``--device cuda``); prints one JSON object that
maps each check to the largest absolute difference found (or to a value the test asserts on).
"""

from __future__ import annotations

import argparse
import json

import torch

from promptalign.ot import hierarchical_ot

B, M, J, D, K, N, L = 2, 2, 21, 24, 3, 2, 5
LENGTHS = [[5, 2], [3, 5], [1, 4]]  # [K, N] ragged text lengths, padding last


def features(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, M, D), (B, M, J, D), (K, N, D), (K, N, L, D)]
    return [torch.randn(*s, generator=g).to(device, dtype) for s in shapes]


def diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    device = torch.device(p.parse_args().device)
    lengths = torch.tensor(LENGTHS, device=device)
    out: dict = {}
    # fixed iteration count (tol = 0): both paths run exactly the same iterations
    fixed = {"text_lengths": lengths, "eps": 0.2, "max_iter": 6, "tol": 0.0, "check_every": 3}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).split(".")[1]
        feats = features(device, dtype)
        for form in ("paper", "released"):
            ref = hierarchical_ot(*feats, form=form, backend="torch", domain="kernel", **fixed)
            fus = hierarchical_ot(*feats, form=form, backend="fused", **fixed)
            out[f"{form}_{name}_backend"] = fus.backend
            out[f"{form}_{name}_distance"] = diff(fus.token_distance, ref.token_distance)
            out[f"{form}_{name}_similarity"] = diff(fus.token_similarity, ref.token_similarity)
            out[f"{form}_{name}_score"] = diff(fus.score, ref.score)
            out[f"{form}_{name}_entropy"] = abs(
                fus.token_stats.mean_entropy.item() - ref.token_stats.mean_entropy.item()
            )
            out[f"{form}_{name}_entropy_value"] = fus.token_stats.mean_entropy.item()
            out[f"{form}_{name}_iters_equal"] = bool(
                torch.equal(fus.token_stats.max_iter, ref.token_stats.max_iter)
            )

    # gradients of the paper-form score with respect to all four feature sets
    grads = {}
    for be, chunk in (("torch", None), ("fused", None), ("fused_chunk1", 1)):
        feats = [x.requires_grad_(True) for x in features(device, torch.float32, seed=1)]
        res = hierarchical_ot(
            *feats, backend=be.split("_")[0], domain="kernel", class_chunk=chunk, **fixed
        )
        w = torch.linspace(-1, 1, B * K, device=device).view(B, K)  # a non-uniform upstream grad
        (res.score * w).sum().backward()
        grads[be] = [x.grad for x in feats]
    for i, name in enumerate(("image_global", "image_tokens", "text_global", "text_tokens")):
        out[f"grad_{name}"] = diff(grads["fused"][i], grads["torch"][i])
        out[f"grad_{name}_scale"] = grads["torch"][i].abs().max().item()
        out[f"grad_{name}_chunk1"] = diff(grads["fused_chunk1"][i], grads["fused"][i])

    # per-problem early stopping: iterations and results as the torch path
    feats = features(device, torch.float32, seed=2)
    early = {"text_lengths": lengths, "eps": 0.3, "max_iter": 60, "tol": 1e-5, "check_every": 3}
    ref = hierarchical_ot(*feats, backend="torch", domain="kernel", **early)
    fus = hierarchical_ot(*feats, backend="fused", **early)
    out["early_score"] = diff(fus.score, ref.score)
    out["early_mean_iter"] = [fus.token_stats.mean_iter.item(), ref.token_stats.mean_iter.item()]
    out["early_max_iter"] = [int(fus.token_stats.max_iter), int(ref.token_stats.max_iter)]
    few = hierarchical_ot(
        *feats, backend="fused", text_lengths=lengths, eps=0.2, tol=1e-9, max_iter=2
    )
    out["few_converged"] = few.token_stats.converged.item()
    out["few_max_iter"] = int(few.token_stats.max_iter)

    # chunk size and batch composition change nothing
    full = hierarchical_ot(*feats, backend="fused", class_chunk=None, **early)
    one = hierarchical_ot(*feats, backend="fused", class_chunk=1, **early)
    ig, it, tg, tt = feats
    part = hierarchical_ot(
        ig[1:], it[1:], tg[1:], tt[1:], backend="fused", **{**early, "text_lengths": lengths[1:]}
    )
    out["chunk_score"] = diff(one.score, full.score)
    out["chunk_distance"] = diff(one.token_distance, full.token_distance)
    out["subset_score"] = diff(part.score, full.score[1:, 1:])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
