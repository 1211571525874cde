"""Hierarchical OT forward: released-code-style per-pair loop vs batched torch vs fused kernel.

All paths score the same synthetic features (B images x K classes, M visual and N text prompt
sets, J image tokens, L text tokens of width D, eps for both levels) in one process, so the
ratios are comparable even on a noisy machine. Prints one JSON line.

    python benchmarks/ot_bench.py                      # GPU: the issue's 64 x 1000 case
    python benchmarks/ot_bench.py --classes 20         # CPU-sized; per-pair time is linear in pairs

"fused" is the GEMM + Triton Sinkhorn kernel of ``promptalign.ot.fused`` (CUDA only); its scores
are compared with the torch path's in the same run (``*_max_score_diff_vs_torch``).

The per-pair loop reproduces the released ALIGN code's structure: a Python loop over (image,
class) pairs, kernel-domain Sinkhorn with a host sync every iteration and its stopping rule
(mean |change of the row scaling| < 1e-2). It is timed on ``--loop-pairs`` pairs and extrapolated
linearly to B x K pairs (reported as such).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from promptalign.ot import fused, hierarchical_ot


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeat: int) -> float:
    fn()  # warm-up (and Triton compilation)
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _released_sinkhorn(
    K: torch.Tensor, u: torch.Tensor, v: torch.Tensor, max_iter: int
) -> torch.Tensor:
    """The released code's Sinkhorn: host sync (`.item()`) every iteration, threshold 1e-2."""
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.transpose(-2, -1), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < 1e-2:
            break
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


def released_pair_loop(ig, it, tg, tt, lengths, eps, max_iter, pairs):
    """Score `pairs` (image, class) pairs one at a time, as the released ALIGN code does."""
    ig, it, tg, tt = (F.normalize(x.float(), dim=-1) for x in (ig, it, tg, tt))
    M, J = it.shape[1:3]
    N = tt.shape[1]
    out = []
    for b, k in pairs:
        Lk = int(lengths[k])
        sim = torch.einsum("mjd,nld->mnjl", it[b], tt[k, :, :Lk]).reshape(M * N, J, Lk)
        kern = torch.exp(-(1 - sim) / eps)
        u = torch.full((M * N, J), 1.0 / J, device=it.device)
        v = torch.full((M * N, Lk), 1.0 / Lk, device=it.device)
        T_hat = _released_sinkhorn(kern, u, v, max_iter)
        tok_sim = (T_hat * sim).sum((-2, -1)).view(M, N)
        s = ig[b] @ tg[k].t()  # [M, N]
        cost = (1 - s) + tok_sim
        T = _released_sinkhorn(
            torch.exp(-cost / eps)[None],
            torch.full((1, M), 1.0 / M, device=it.device),
            torch.full((1, N), 1.0 / N, device=it.device),
            max_iter,
        )[0]
        out.append((T * s).sum())
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--classes", type=int, default=None, help="default 1000 on GPU, 20 on CPU")
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--j", type=int, default=198)
    p.add_argument("--l", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=20, help="fixed iterations per level")
    p.add_argument(
        "--early-tol", type=float, default=1e-3, help="marginal error for the early-stop runs"
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="bf16", help="feature dtype"
    )
    p.add_argument("--budget-gb", type=float, default=4.0, help="memory budget of the torch path")
    p.add_argument("--loop-pairs", type=int, default=None, help="pairs timed in the per-pair loop")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    K = args.classes or (1000 if device.type == "cuda" else 20)
    B, M, N, J, L, D = args.images, args.m, args.n, args.j, args.l, args.d
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(args.seed)

    def mk(*s):
        return F.normalize(torch.randn(*s, generator=g), dim=-1).to(device, dtype)

    ig, it, tg, tt = mk(B, M, D), mk(B, M, J, D), mk(K, N, D), mk(K, N, L, D)
    lengths = torch.randint(max(1, L // 2), L + 1, (K,), generator=g).to(device)
    common = dict(
        text_lengths=lengths, eps=args.eps, normalize=False, memory_budget=int(args.budget_gb * 1e9)
    )
    fixed = dict(common, max_iter=args.iters, tol=0.0, check_every=args.iters)
    early = dict(common, max_iter=100, tol=args.early_tol, check_every=5)

    result: dict = {
        "bench": "hierarchical_ot_forward",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "B": B,
        "K": K,
        "M": M,
        "N": N,
        "J": J,
        "L": L,
        "D": D,
        "eps": args.eps,
        "iters_per_level": args.iters,
        "dtype": args.dtype,
        "torch": torch.__version__,
    }

    n_pairs = args.loop_pairs or (200 if device.type == "cuda" else 40)
    pairs = [(i % B, (i * 7) % K) for i in range(n_pairs)]
    with torch.no_grad():
        t_loop = _time(
            lambda: released_pair_loop(ig, it, tg, tt, lengths, args.eps, 100, pairs), device, 1
        )
    result["per_pair_loop_s_per_pair"] = t_loop / n_pairs
    result["per_pair_loop_s_extrapolated"] = t_loop / n_pairs * B * K
    result["per_pair_loop_pairs_timed"] = n_pairs

    backends = ["torch"] + (["fused"] if fused.available() and device.type == "cuda" else [])
    scores = {}
    for be in backends:
        for name, kw in (("fixed", fixed), ("early", early)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with torch.no_grad():
                t = _time(
                    lambda be=be, kw=kw: hierarchical_ot(ig, it, tg, tt, backend=be, **kw),
                    device,
                    args.repeat,
                )
                res = hierarchical_ot(ig, it, tg, tt, backend=be, **kw)
            key = f"{be}_{name}"
            scores[key] = res.score
            if be != "torch":
                diff = (res.score - scores[f"torch_{name}"]).abs().max().item()
                result[f"{key}_max_score_diff_vs_torch"] = diff
            result[f"{key}_s"] = t
            result[f"{key}_speedup_vs_loop"] = result["per_pair_loop_s_extrapolated"] / t
            result[f"{key}_token_mean_iter"] = round(res.token_stats.mean_iter.item(), 2)
            result[f"{key}_token_max_iter"] = int(res.token_stats.max_iter)
            result[f"{key}_token_converged"] = round(res.token_stats.converged.item(), 4)
            if device.type == "cuda":
                result[f"{key}_peak_mem_gb"] = (
                    torch.cuda.max_memory_allocated(device) - base
                ) / 1e9
    if "fused_fixed_s" in result:
        result["fused_vs_torch_fixed"] = result["torch_fixed_s"] / result["fused_fixed_s"]
        result["fused_vs_torch_early"] = result["torch_early_s"] / result["fused_early_s"]
    # process peak RSS (CPU runs): includes the interpreter and torch itself
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(result))


if __name__ == "__main__":
    main()
