"""ALIGN's token-level OT as one GEMM plus a Triton Sinkhorn kernel (GPU fast path).

Design (issue 15): the arithmetic is done once.

1. **One GEMM per class chunk.** The cosines of every image token against every text token of a
   chunk of classes are one matrix product ``G^T = s r^T`` of the *raw* features,
   ``[Kc*N*L, D] x [D, B*M*J]``, in the features' own dtype (bf16/fp16 on tensor cores, fp32 as
   is) with an **fp32 result** (``torch.mm(..., out_dtype=torch.float32)`` on CUDA; an fp32
   product elsewhere). A bf16 x bf16 or fp16 x fp16 product is exact in fp32, so this equals the
   fp32 product of the same inputs up to summation order. The L2 normalisation is not applied to
   the inputs (which would round the normalised features to bf16/fp16) but inside the kernel as
   fp32 inverse norms: ``S_jl = G_jl / (|r_j| |s_l|)``.
2. **One Sinkhorn kernel.** One program per (image b, visual set m, class k, text set n) problem
   reads its ``L x J`` block of ``G^T`` once (``j`` contiguous), scales it to cosines, builds the
   shifted kernel ``exp((S - max S) / eps)`` (the plan is invariant to scaling the kernel) and
   iterates kernel-domain Sinkhorn in registers with its own early stop (L1 column-marginal error
   checked every ``check_every`` iterations, the same schedule as ``sinkhorn``): it writes four
   numbers, ``<T, 1 - S>``, ``<T, S>``, the final error and the iterations, and - only when a
   gradient is needed - the plan ``T`` over its block of the buffer (in place).
3. **Envelope backward as GEMMs** (:class:`TokenOT`). With plans constant, ``d<T, 1 - S>/dS = -T``
   and ``d<T, S>/dS = T``; with ``W = T * (g_sim - g_dist)`` per problem, the gradients are
   ``dL/d r_hat = W^T s_hat`` and ``dL/d s_hat = W r_hat`` (two GEMMs per chunk, fp32), then
   the normalisation's backward ``(x - x_hat (x_hat . x)) / |x|``.

Classes are processed in chunks so the similarity buffer (4 bytes per entry, nothing else of
that size) stays within ``memory_budget``; every problem is solved by its own program from its
own block, so results do not depend on the chunk size or on which images and classes share the
call (up to the GEMM's summation order, ~1e-7).

Precision: every path accumulates in fp32 whatever the input dtype. Cosines: exact products of the
given features, fp32 sums (difference to the fp32 torch reference path ~1e-6). Sinkhorn: fp32,
kernel domain with the per-problem maximum similarity subtracted, safe for costs in [0, 2] down
to ``eps = MIN_EPS``; smaller ``eps`` is refused here and served by the torch log-domain path.
The only precision a caller can lose is in the features themselves (e.g. an encoder run under
bf16 autocast: bf16 keeps 8 significant bits, fp16 11).

Setting ``TRITON_INTERPRET=1`` before Triton is imported runs the same kernel on CPU tensors
(slowly), which is how the CPU test suite checks it against the torch path. The kernel avoids
constructs the Triton 3.6 interpreter cannot run with NumPy >= 2.3 (Python ``range`` over a
runtime scalar argument, which that interpreter converts with ``int()`` of a 1-element array):
loop bounds are ``tl.constexpr`` and the early stop is a ``while`` on a scalar condition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .options import TokenOptions

try:  # Triton is optional: CPU installs and CI never need it
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - a broken Triton must not break import
    _HAVE_TRITON = False

MIN_EPS = 0.03
# bytes per similarity entry held per class chunk (the fp32 buffer; everything else is on chip)
BYTES_PER_ENTRY = 4


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernel can run: Triton importable and a CUDA device (or the interpreter)."""
    return _HAVE_TRITON and (torch.cuda.is_available() or interpreted())


@dataclass
class TokenOTResult:
    distance: torch.Tensor  # [B, K, M, N]  <T, 1 - S> (differentiable when a gradient is needed)
    similarity: torch.Tensor  # [B, K, M, N]  <T, S>
    error: torch.Tensor  # [B, K, M, N]  final L1 column-marginal error
    n_iter: torch.Tensor  # [B, K, M, N]  iterations run
    converged: torch.Tensor  # [B, K, M, N]  error <= tol
    entropy: torch.Tensor  # [B, K, M, N]  H(T) / H(a b^T) of the plan's own marginals (1 = uniform)


if _HAVE_TRITON:

    @triton.jit
    def _sinkhorn_block_kernel(
        G,
        INV_R,
        INV_S,
        LEN,
        OUT_DIST,
        OUT_SIM,
        OUT_ERR,
        OUT_ITER,
        OUT_ENT,
        M,
        KC,
        N,
        J,
        L,
        K_TOTAL,
        K0,
        ROW,
        inv_eps,
        max_iter,
        tol,
        CHECK: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_L: tl.constexpr,
        STORE_PLAN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # pid -> (b, m, k, n), n fastest; k indexes the chunk, K0 + k the class
        n = pid % N
        t = pid // N
        k = t % KC
        t = t // KC
        m = t % M
        b = t // M

        offs_l = tl.arange(0, BLOCK_L)
        offs_j = tl.arange(0, BLOCK_J)
        length = tl.load(LEN + (K0 + k) * N + n)
        ml = offs_l < length
        mj = offs_j < J
        valid = ml[:, None] & mj[None, :]  # [BL, BJ]

        row0 = (k * N + n) * L  # first row of this problem in G^T [Kc*N*L, B*M*J]
        col0 = (b * M + m) * J
        rows = (row0 + offs_l).to(tl.int64)
        ptrs = G + rows[:, None] * ROW + (col0 + offs_j)[None, :]
        g = tl.load(ptrs, mask=valid, other=0.0)  # [BL, BJ] raw products, read once
        inv_s = tl.load(INV_S + row0 + offs_l, mask=ml, other=0.0)
        inv_r = tl.load(INV_R + col0 + offs_j, mask=mj, other=0.0)
        sim = g * inv_s[:, None] * inv_r[None, :]  # cosines, fp32

        smax = tl.max(tl.max(tl.where(valid, sim, -float("inf")), axis=1), axis=0)
        # kernel exp(-(C - Cmin)/eps) with C = 1 - S; only this tile stays live in the loop
        kern = tl.where(valid, tl.exp((sim - smax) * inv_eps), 0.0)  # [BL, BJ]
        a = tl.where(mj, 1.0 / J, 0.0)  # [BJ]
        bm = tl.where(ml, 1.0 / length.to(tl.float32), 0.0)  # [BL]
        u = tl.where(mj, 1.0, 0.0)
        v = tl.zeros([BLOCK_L], dtype=tl.float32)

        it = 0
        err = float("inf")
        while (it < max_iter) & (err > tol):
            for i in range(CHECK):  # constexpr bound; iterations past max_iter are masked out
                live = (it + i) < max_iter
                ktu = tl.sum(kern * u[None, :], axis=1)  # [BL]
                v = tl.where(live, tl.where(ml, bm / tl.where(ml, ktu, 1.0), 0.0), v)
                kv = tl.sum(kern * v[:, None], axis=0)  # [BJ]
                u = tl.where(live, tl.where(mj, a / tl.where(mj, kv, 1.0), 0.0), u)
            it = tl.minimum(it + CHECK, max_iter)
            col = v * tl.sum(kern * u[None, :], axis=1)
            err = tl.sum(tl.abs(col - bm), axis=0)

        plan = v[:, None] * kern * u[None, :]  # [BL, BJ], zero off the real tokens
        # S recovered from the kernel instead of keeping the tile live: S = smax + eps log(kern)
        sim_r = tl.where(valid, smax + tl.log(tl.where(valid, kern, 1.0)) / inv_eps, 0.0)
        simv = tl.sum(tl.sum(plan * sim_r, axis=1), axis=0)
        mass = tl.sum(tl.sum(plan, axis=1), axis=0)
        out = ((b * K_TOTAL + K0 + k) * M + m) * N + n  # outputs laid out [B, K, M, N]
        tl.store(OUT_DIST + out, mass - simv)  # <T, 1 - S>
        tl.store(OUT_SIM + out, simv)
        tl.store(OUT_ERR + out, err)
        tl.store(OUT_ITER + out, it)
        # entropy relative to the independent coupling of the plan's marginals (ot.entropy)
        p = plan / tl.maximum(mass, 1e-38)
        h = -tl.sum(
            tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), axis=1), axis=0
        )
        pa = tl.sum(p, axis=0)  # [BJ] image-token marginal
        pb = tl.sum(p, axis=1)  # [BL] word marginal
        h_u = -tl.sum(tl.where(pa > 0, pa * tl.log(tl.where(pa > 0, pa, 1.0)), 0.0), axis=0)
        h_u -= tl.sum(tl.where(pb > 0, pb * tl.log(tl.where(pb > 0, pb, 1.0)), 0.0), axis=0)
        tl.store(OUT_ENT + out, tl.where(h_u > 0, h / tl.maximum(h_u, 1e-38), 1.0))
        if STORE_PLAN:  # padding rows get 0, so the buffer holds exactly T for the backward
            tl.store(ptrs, plan, mask=(offs_l < L)[:, None] & mj[None, :])


def _pow2(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, (int(x) - 1).bit_length()))


def _inv_norm(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """fp32 ``1 / max(|x|, 1e-12)`` over the last dim (F.normalize's rule), or ones."""
    if not normalize:
        return torch.ones(x.shape[:-1], device=x.device, dtype=torch.float32)
    return 1.0 / torch.linalg.vector_norm(x.float(), dim=-1).clamp_min(1e-12)


_OUT_DTYPE_MM = True  # flips off once if this torch lacks mm(..., out_dtype=...)


def gemm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` with an fp32 result: low-precision inputs on tensor cores, fp32 accumulation."""
    global _OUT_DTYPE_MM
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _OUT_DTYPE_MM:
        try:
            return torch.mm(a, b.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: fp32 product
            _OUT_DTYPE_MM = False
    return torch.mm(a.float(), b.float().t())


def chunk_classes(B: int, M: int, N: int, J: int, L: int, memory_budget: int) -> int:
    """Classes per chunk so that the fp32 similarity buffer stays under ``memory_budget``."""
    per_class = B * M * J * N * L * BYTES_PER_ENTRY
    return max(1, int(memory_budget // max(per_class, 1)))


def _forward(
    r: torch.Tensor,
    s: torch.Tensor,
    lengths: torch.Tensor,
    inv_r: torch.Tensor,
    inv_s: torch.Tensor,
    eps: float,
    max_iter: int,
    tol: float,
    check_every: int,
    chunk: int,
    store_plan: bool,
):
    """Run GEMM + kernel over class chunks; returns outputs and (if asked) the plans per chunk."""
    B, M, J, D = r.shape
    K, N, L, _ = s.shape
    dev = r.device
    shape = (B, K, M, N)
    dist = torch.empty(shape, device=dev, dtype=torch.float32)
    sim = torch.empty_like(dist)
    err = torch.empty_like(dist)
    iters = torch.empty(shape, device=dev, dtype=torch.int32)
    ent = torch.empty_like(dist)
    plans: list[torch.Tensor] = []
    if dist.numel() == 0:
        return dist, sim, err, iters, ent, plans
    r2 = r.reshape(B * M * J, D)
    inv_r = inv_r.reshape(-1).contiguous()
    inv_s = inv_s.reshape(K, N * L)
    block_j, block_l = _pow2(J, 16), _pow2(L, 16)
    for k0 in range(0, K, chunk):
        kc = min(chunk, K - k0)
        g = gemm_fp32(s[k0 : k0 + kc].reshape(kc * N * L, D), r2).contiguous()  # [kc*N*L, B*M*J]
        _sinkhorn_block_kernel[(B * M * kc * N,)](
            g,
            inv_r,
            inv_s[k0 : k0 + kc].contiguous(),
            lengths,
            dist,
            sim,
            err,
            iters,
            ent,
            M,
            kc,
            N,
            J,
            L,
            K,
            k0,
            B * M * J,
            1.0 / eps,
            int(max_iter),
            float(tol),
            CHECK=int(check_every),
            BLOCK_J=block_j,
            BLOCK_L=block_l,
            STORE_PLAN=store_plan,
            num_warps=4 if block_j * block_l <= 4096 else 8,
        )
        if store_plan:
            plans.append(g)
    return dist, sim, err, iters, ent, plans


class TokenOT(torch.autograd.Function):
    """Token-level OT with the envelope gradient; forward = GEMM + kernel, backward = GEMMs."""

    @staticmethod
    def forward(ctx, r, s, lengths, normalize, eps, max_iter, tol, check_every, chunk):
        inv_r = _inv_norm(r, normalize)  # [B, M, J]
        inv_s = _inv_norm(s, normalize)  # [K, N, L]
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dist, sim, err, iters, ent, plans = _forward(
            r, s, lengths, inv_r, inv_s, eps, max_iter, tol, check_every, chunk, need
        )
        ctx.mark_non_differentiable(err, iters, ent)
        if need:
            ctx.save_for_backward(r, s, inv_r, inv_s, *plans)
            ctx.chunk, ctx.normalize = chunk, normalize
        return dist, sim, err, iters, ent

    @staticmethod
    def backward(ctx, g_dist, g_sim, _g_err, _g_iter, _g_ent):
        r, s, inv_r, inv_s, *plans = ctx.saved_tensors
        B, M, J, D = r.shape
        K, N, L, _ = s.shape
        coef = torch.zeros(B, K, M, N, device=r.device, dtype=torch.float32)
        if g_sim is not None:
            coef = coef + g_sim.float()
        if g_dist is not None:
            coef = coef - g_dist.float()  # d<T, 1 - S>/dS = -T
        r_hat = (r.float() * inv_r.unsqueeze(-1)).reshape(B * M * J, D)  # fp32
        s_hat = s.float() * inv_s.unsqueeze(-1)  # [K, N, L, D]
        x_r = torch.zeros_like(r_hat)  # dL/d r_hat  [B*M*J, D]
        x_s = torch.empty_like(s_hat)  # dL/d s_hat  [K, N, L, D]
        for i, plan in enumerate(plans):
            k0 = i * ctx.chunk
            kc = plan.shape[0] // (N * L)
            c = coef[:, k0 : k0 + kc].permute(1, 3, 0, 2)  # [kc, N, B, M]
            w = (plan.view(kc, N, L, B, M, J) * c[:, :, None, :, :, None]).view(kc * N * L, -1)
            x_r += w.t() @ s_hat[k0 : k0 + kc].reshape(kc * N * L, D)  # [B*M*J, D]
            x_s[k0 : k0 + kc] = (w @ r_hat).view(kc, N, L, D)
        x_r = x_r.view(B, M, J, D)
        if ctx.normalize:  # backward of x -> x / |x|
            r_hat = r_hat.view(B, M, J, D)
            x_r = (x_r - r_hat * (r_hat * x_r).sum(-1, keepdim=True)) * inv_r.unsqueeze(-1)
            x_s = (x_s - s_hat * (s_hat * x_s).sum(-1, keepdim=True)) * inv_s.unsqueeze(-1)
        return x_r.to(r.dtype), x_s.to(s.dtype), None, None, None, None, None, None, None


def token_ot(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    options: TokenOptions,
    *,
    normalize: bool = True,
) -> TokenOTResult:
    """All token-level OT problems of the hierarchical OT: one GEMM + one kernel per class chunk.

    Differentiable (envelope gradient) with respect to both token sets when autograd needs it;
    the plans are then kept (4 bytes per similarity entry) until the backward pass.

    Args:
        image_tokens: ``[B, M, J, D]`` image tokens (fp32, fp16 or bf16; normalised here unless
            ``normalize=False``).
        text_tokens: ``[K, N, L, D]`` text tokens (cast to the image tokens' dtype for the GEMM).
        text_mask: ``[K, N, L]`` bool; real tokens must come first (a prefix mask), as token
            sequences are padded at the end.
        options: the token level's options: ``eps`` (>= ``MIN_EPS``), ``max_iter``, ``tol``,
            ``check_every`` as in ``sinkhorn`` (balanced, kernel domain); ``memory_budget``:
            bytes of the fp32 similarity buffer per class chunk; ``class_chunk``: force classes
            per chunk (results do not depend on it).
        normalize: L2-normalise the tokens (in fp32, inside the kernel).
    """
    eps, max_iter, tol, check_every = (
        options.eps,
        options.max_iter,
        options.tol,
        options.check_every,
    )
    if not available():
        raise RuntimeError(
            "the fused OT kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1); "
            "use backend='torch'"
        )
    if eps < MIN_EPS:
        raise ValueError(
            f"the fused kernel works in the kernel domain and needs eps >= {MIN_EPS} (got {eps}); "
            "use backend='torch' with domain='log'"
        )
    if not options.balanced:
        raise ValueError(
            f"the fused kernel solves balanced OT (tau={options.tau} was asked); use "
            "backend='torch'"
        )
    B, M, J, _ = image_tokens.shape
    _, N, L, _ = text_tokens.shape
    lengths = text_mask.sum(-1).to(torch.int32).contiguous()  # [K, N]
    prefix = torch.arange(L, device=text_mask.device) < lengths.unsqueeze(-1)
    if not torch.equal(prefix, text_mask.bool()):
        raise ValueError(
            "the fused kernel needs prefix text masks (real tokens first, padding last)"
        )
    if text_tokens.dtype != image_tokens.dtype:
        text_tokens = text_tokens.to(image_tokens.dtype)
    chunk = options.class_chunk or chunk_classes(B, M, N, J, L, options.memory_budget)
    with torch.autocast(image_tokens.device.type, enabled=False):
        dist, sim, err, iters, ent = TokenOT.apply(
            image_tokens.contiguous(),
            text_tokens.contiguous(),
            lengths,
            normalize,
            float(eps),
            int(max_iter),
            float(tol),
            int(check_every),
            int(chunk),
        )
    return TokenOTResult(dist, sim, err, iters.long(), err <= tol, ent)
