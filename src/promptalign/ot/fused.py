"""Fused Triton kernel for ALIGN's token-level OT problems (optional GPU fast path).

One program solves one (image b, visual set m, class k, text set n) problem entirely on-chip:
it builds the ``J x L`` cosine matrix from the features with ``tl.dot`` over the embedding width,
runs kernel-domain Sinkhorn on registers with its own early stop (L1 column-marginal error
checked every ``check_every`` iterations), and writes four numbers: the token distance
``<T, 1 - S>``, the token similarity ``<T, S>``, the final marginal error and the iterations.
Nothing of size ``J x L`` ever reaches global memory. Programs are ordered so that consecutive
ones share the image tokens (b, m), which then stay in L2.

The kernel works in the kernel domain with the per-problem minimum cost subtracted first (the plan
is invariant to scaling the kernel), which is safe in fp32 for costs in [0, 2] down to eps ~0.03;
smaller eps is refused here and served by the torch log-domain path. It computes no gradient: it
serves evaluation and the released-code form, where plans are constants.

Setting ``TRITON_INTERPRET=1`` before Triton is imported runs the same kernel on CPU tensors
(slowly), which is how the CPU test suite checks it against the torch path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: CPU installs and CI never need it
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    _HAVE_TRITON = False

MIN_EPS = 0.03


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the fused kernel can run: Triton importable and a CUDA device (or the interpreter)."""
    return _HAVE_TRITON and (torch.cuda.is_available() or interpreted())


@dataclass
class TokenOTResult:
    distance: torch.Tensor  # [B, K, M, N]  <T, 1 - S>
    similarity: torch.Tensor  # [B, K, M, N]  <T, S>
    error: torch.Tensor  # [B, K, M, N]  final L1 column-marginal error
    n_iter: torch.Tensor  # [B, K, M, N]  iterations run
    converged: torch.Tensor  # [B, K, M, N]  error <= tol


if _HAVE_TRITON:

    @triton.jit
    def _token_ot_kernel(
        R, S, LEN, OUT_DIST, OUT_SIM, OUT_ERR, OUT_ITER,
        M, K, N, J, D,
        s_rb, s_rm, s_rj, s_rd,
        s_sk, s_sn, s_sl, s_sd,
        inv_eps, max_iter, tol, check_every,
        BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # pid -> (b, m, k, n) with n fastest: neighbouring programs reuse the image tokens (b, m)
        n = pid % N
        t = pid // N
        k = t % K
        t = t // K
        m = t % M
        b = t // M

        offs_j = tl.arange(0, BLOCK_J)
        offs_l = tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, BLOCK_D)
        length = tl.load(LEN + k * N + n)
        mj = offs_j < J
        ml = offs_l < length

        r_base = R + b.to(tl.int64) * s_rb + m * s_rm
        s_base = S + k.to(tl.int64) * s_sk + n * s_sn
        sim = tl.zeros([BLOCK_J, BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = (d0 + offs_d) < D
            r_t = tl.load(
                r_base + offs_j[:, None] * s_rj + (d0 + offs_d)[None, :] * s_rd,
                mask=mj[:, None] & dm[None, :], other=0.0,
            )  # [BJ, BD]
            s_t = tl.load(
                s_base + offs_l[None, :] * s_sl + (d0 + offs_d)[:, None] * s_sd,
                mask=ml[None, :] & dm[:, None], other=0.0,
            )  # [BD, BL]
            if IEEE:
                sim += tl.dot(r_t, s_t, input_precision="ieee")
            else:
                sim += tl.dot(r_t, s_t)

        valid = mj[:, None] & ml[None, :]
        smax = tl.max(tl.max(tl.where(valid, sim, -float("inf")), axis=1), axis=0)
        # kernel exp(-(C - Cmin)/eps) with C = 1 - S; only this tile stays live in the loop
        kern = tl.where(valid, tl.exp((sim - smax) * inv_eps), 0.0)  # [BJ, BL]
        a = tl.where(mj, 1.0 / J, 0.0)
        bm = tl.where(ml, 1.0 / length.to(tl.float32), 0.0)
        u = tl.where(mj, 1.0, 0.0)
        v = tl.zeros([BLOCK_L], dtype=tl.float32)

        it = 0
        err = float("inf")
        while (it < max_iter) & (err > tol):
            steps = tl.minimum(check_every, max_iter - it)
            for _ in range(0, steps):
                ktu = tl.sum(kern * u[:, None], axis=0)  # [BL]
                v = tl.where(ml, bm / tl.where(ml, ktu, 1.0), 0.0)
                kv = tl.sum(kern * v[None, :], axis=1)  # [BJ]
                u = tl.where(mj, a / tl.where(mj, kv, 1.0), 0.0)
            it += steps
            col = v * tl.sum(kern * u[:, None], axis=0)
            err = tl.sum(tl.abs(col - bm), axis=0)

        plan = u[:, None] * kern * v[None, :]
        # recover S from the kernel instead of keeping it live: S = smax + eps * log(kern)
        sim_r = tl.where(valid, smax + tl.log(tl.where(valid, kern, 1.0)) / inv_eps, 0.0)
        simv = tl.sum(tl.sum(plan * sim_r, axis=1), axis=0)
        mass = tl.sum(tl.sum(plan, axis=1), axis=0)
        dist = mass - simv  # <T, 1 - S>
        out = ((b * K + k) * M + m) * N + n  # outputs laid out [B, K, M, N]
        tl.store(OUT_DIST + out, dist)
        tl.store(OUT_SIM + out, simv)
        tl.store(OUT_ERR + out, err)
        tl.store(OUT_ITER + out, it)


def _pow2(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, (int(x) - 1).bit_length()))


def token_ot(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    check_every: int = 5,
) -> TokenOTResult:
    """All token-level OT problems of the hierarchical OT in one kernel launch.

    Args:
        image_tokens: ``[B, M, J, D]`` L2-normalised image tokens (fp32, fp16 or bf16).
        text_tokens: ``[K, N, L, D]`` L2-normalised text tokens, same dtype.
        text_mask: ``[K, N, L]`` bool; real tokens must come first (a prefix mask), as token
            sequences are padded at the end.
        eps: regularisation (>= 0.03 here), max_iter, tol, check_every: as in ``sinkhorn``.
    """
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
    B, M, J, D = image_tokens.shape
    K, N, L, _ = text_tokens.shape
    lengths = text_mask.sum(-1).to(torch.int32).contiguous()  # [K, N]
    prefix = torch.arange(L, device=text_mask.device) < lengths.unsqueeze(-1)
    if not torch.equal(prefix, text_mask.bool()):
        raise ValueError("the fused kernel needs prefix text masks (real tokens first, padding last)")
    if text_tokens.dtype != image_tokens.dtype:
        text_tokens = text_tokens.to(image_tokens.dtype)
    dev = image_tokens.device
    shape = (B, K, M, N)
    dist = torch.empty(shape, device=dev, dtype=torch.float32)
    sim = torch.empty_like(dist)
    err = torch.empty_like(dist)
    iters = torch.empty(shape, device=dev, dtype=torch.int32)
    if dist.numel() == 0:
        return TokenOTResult(dist, sim, err, iters.long(), err <= tol)
    block_j = _pow2(J, 16)
    block_l = _pow2(L, 16)
    block_d = min(32, _pow2(D, 16))  # 32: no register spills at J=256 x L=16 on sm_90 (8 warps)
    grid = (B * M * K * N,)
    _token_ot_kernel[grid](
        image_tokens, text_tokens, lengths, dist, sim, err, iters,
        M, K, N, J, D,
        *image_tokens.stride(), *text_tokens.stride(),
        1.0 / eps, int(max_iter), float(tol), int(check_every),
        BLOCK_J=block_j, BLOCK_L=block_l, BLOCK_D=block_d,
        IEEE=image_tokens.dtype == torch.float32,
        num_warps=4 if block_j * block_l < 4096 else 8,
    )
    return TokenOTResult(dist, sim, err, iters.long(), err <= tol)
