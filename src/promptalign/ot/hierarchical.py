"""ALIGN's hierarchical optimal transport between prompted image and text features.

For every image b and class k (Wang et al., NeurIPS 2023, arXiv 2309.13847):

* token level, for every visual prompt set m and text prompt set n: cosines ``S = r s^T``
  between the image tokens r (``J`` patches + prompt tokens) and the class's text tokens s
  (``L_k`` real tokens; padding gets zero mass), cost ``1 - S``, uniform marginals, entropic OT with
  ``eps_token`` -> plan ``T_hat``; token distance ``<T_hat, 1 - S>`` and similarity ``<T_hat, S>``.
* prompt level: cosines ``s_mn`` of the global features; cost
    - paper form:    ``C_mn = (1 - s_mn) + beta * <T_hat, 1 - S>``  (a distance)
    - released form: ``C_mn = (1 - s_mn) + beta * <T_hat, S>``      (the released code adds the
      transported *similarity*; it has no beta, i.e. beta = 1)
  uniform marginals 1/M, 1/N, entropic OT with ``eps`` -> plan ``T``.
* score: paper form ``1 - <T, C>`` (gradient reaches token features through C, plans constant);
  released form ``<T, s>`` (only the global cosines carry gradient).

Two backends compute the token level, with the same numbers (~1e-6, any input dtype):

* "torch" (reference, CPU fallback): one batched matmul of L2-normalised fp32 features per chunk
  of classes, then batched ``sinkhorn`` (log or kernel domain), autograd for the envelope
  gradient. Peak memory ~32 bytes per token-cost entry of a chunk.
* "fused" (CUDA + Triton, ``promptalign.ot.fused``): one GEMM of the raw features per chunk
  (bf16/fp16 on tensor cores, fp32 accumulation and result) and one Triton kernel that solves
  every J x L problem in registers with its own early stop; the envelope backward is two GEMMs.
  4 bytes per entry of a chunk (plus the kept plans, 4 bytes per entry, when training).

Classes are processed in chunks so the peak memory stays under ``memory_budget``; results do not
depend on the chunk size or on which images/classes share a call (each problem stops on its own).
Precision: autocast is switched off inside and everything after the features is fp32 (fp64 if
given), so bf16/fp16 features lose nothing beyond their own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .entropy import entropy_ratio_from_potentials, plan_entropy_ratio
from .sinkhorn import Domain, GradMode, sinkhorn

Form = Literal["paper", "released"]
Backend = Literal["auto", "torch", "fused"]

# fp32 copies of a [.., J, L] token problem alive at once in the torch path (similarities, cost,
# log-kernel, plan, logsumexp temporaries, autograd saves): used to size class chunks.
_TORCH_BYTES_PER_ENTRY = 4 * 8
# token-cost entries per chunk of the torch path on a CPU (4 MiB in fp32): a chunk's kernel, its
# transpose, cost and plan then stay in the last-level cache through the Sinkhorn iterations
# (measured on a 2-core EPYC, ALIGN's training step at batch 32 and its evaluation at 256:
# 1.4x and 2x faster than one chunk of every class)
CPU_CHUNK_ENTRIES = 1 << 20
# below this eps the torch path switches to the log domain when domain="auto"
KERNEL_DOMAIN_MIN_EPS = 0.05


@dataclass
class OTStats:
    """Convergence summary of one OT level (tensors, no host sync)."""

    converged: torch.Tensor  # fraction of problems that converged, scalar
    mean_iter: torch.Tensor  # mean iterations run, scalar
    max_iter: torch.Tensor  # most iterations any problem ran, scalar
    max_error: torch.Tensor  # largest final marginal error, scalar
    # mean plan entropy relative to the uniform coupling (1.0 = the OT did not move the plan)
    mean_entropy: torch.Tensor


@dataclass
class HierarchicalOTResult:
    """Scores and intermediate quantities of the hierarchical OT.

    Attributes:
        score: ``[B, K]`` image-class score (paper: ``1 - <T, C>``; released: ``<T, s>``);
            logits are ``logit_scale * score``.
        prompt_plan: ``[B, K, M, N]`` prompt-level plans T.
        prompt_cost: ``[B, K, M, N]`` prompt-level costs C.
        global_sim: ``[B, K, M, N]`` cosines of the global features.
        token_distance: ``[B, K, M, N]`` ``<T_hat, 1 - S>``.
        token_similarity: ``[B, K, M, N]`` ``<T_hat, S>``.
        token_stats, prompt_stats: convergence of the two levels.
        backend: "torch" or "fused", whichever computed the token level.
    """

    score: torch.Tensor
    prompt_plan: torch.Tensor
    prompt_cost: torch.Tensor
    global_sim: torch.Tensor
    token_distance: torch.Tensor
    token_similarity: torch.Tensor
    token_stats: OTStats
    prompt_stats: OTStats
    backend: str


def _stats(
    converged: torch.Tensor, n_iter: torch.Tensor, err: torch.Tensor, entropy: torch.Tensor
) -> OTStats:
    return OTStats(
        converged=converged.float().mean(),
        mean_iter=n_iter.float().mean(),
        max_iter=n_iter.max(),
        max_error=err.max(),
        mean_entropy=entropy.float().mean(),
    )


def lengths_to_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[...]`` token counts -> ``[..., size]`` bool mask of the real tokens."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(-1)


def class_chunk_size(batch: int, m: int, n: int, j: int, text_len: int, memory_budget: int) -> int:
    """Classes per chunk so that the torch token level stays under ``memory_budget`` bytes."""
    per_class = batch * m * n * j * text_len * _TORCH_BYTES_PER_ENTRY
    return max(1, int(memory_budget // max(per_class, 1)))


def cpu_chunks(
    batch: int, classes: int, m: int, n: int, j: int, text_len: int, memory_budget: int
) -> tuple[int, int]:
    """(images, classes) per chunk of the torch token level on a CPU.

    Every Sinkhorn iteration streams the chunk's kernel twice, so a chunk that stays in the
    CPU's caches runs several times faster than one that streams from memory: chunks hold about
    ``CPU_CHUNK_ENTRIES`` token-cost entries (classes first, then images when one class is
    more), and never more than ``memory_budget`` allows. Results do not depend on the chunks.
    """
    per_image_class = m * n * j * text_len
    target = max(1, min(CPU_CHUNK_ENTRIES, memory_budget // _TORCH_BYTES_PER_ENTRY))
    if batch * per_image_class <= target:
        return batch, max(1, min(classes, target // (batch * per_image_class)))
    return max(1, target // per_image_class), 1


def _fused_reason(image_tokens: torch.Tensor, eps_token: float, domain: str) -> str | None:
    """Why the fused kernel cannot serve this call (None when it can)."""
    from . import fused

    if not fused.available():
        return "it needs Triton and a CUDA device (or TRITON_INTERPRET=1)"
    if not (image_tokens.is_cuda or fused.interpreted()):
        return f"the features are on {image_tokens.device}, not CUDA"
    if domain != "kernel":
        return f"it works in the kernel domain and domain={domain!r} was asked"
    if eps_token < fused.MIN_EPS:
        return f"it needs eps_token >= {fused.MIN_EPS} (got {eps_token})"
    if image_tokens.dtype == torch.float64:
        return "it computes in fp32 and the features are fp64"
    return None


# data-dependent early stopping and the Triton kernel: never traced by torch.compile (graph break)
@torch.compiler.disable
def hierarchical_ot(
    image_global: torch.Tensor,
    image_tokens: torch.Tensor,
    text_global: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    *,
    text_lengths: torch.Tensor | None = None,
    beta: float = 1.0,
    eps: float = 0.1,
    eps_token: float | None = None,
    max_iter: int = 100,
    max_iter_token: int | None = None,
    tol: float = 1e-3,
    tol_token: float | None = None,
    form: Form = "paper",
    domain: Domain | Literal["auto"] = "auto",
    grad: GradMode = "envelope",
    normalize: bool = True,
    memory_budget: int = 2 * 1024**3,
    class_chunk: int | None = None,
    backend: Backend = "auto",
    check_every: int = 5,
) -> HierarchicalOTResult:
    """Score every (image, class) pair with ALIGN's two-level OT.

    Args:
        image_global: ``[B, M, D]`` global image features (one per visual prompt set).
        image_tokens: ``[B, M, J, D]`` image token features (patches + visual prompt tokens).
        text_global: ``[K, N, D]`` global text features (one per text prompt set).
        text_tokens: ``[K, N, L, D]`` text token features, padded to L.
        text_mask: ``[K, N, L]`` or ``[K, L]`` bool, True for real tokens; or give
            ``text_lengths`` (``[K]`` or ``[K, N]``). Default: all L tokens are real.
        beta: weight of the token-level term in the prompt-level cost.
        eps, eps_token: entropic regularisation of the prompt and token level (token defaults to
            eps).
        max_iter, max_iter_token, tol, tol_token: Sinkhorn limits per level (tol on the L1
            marginal error; token level defaults to the prompt-level values).
        form: "paper" (distance, gradient through the token level) or "released" (the released
            code: transported similarity added to the cost, score from global cosines only).
        domain: Sinkhorn domain of the torch path; "auto" takes the faster kernel domain when
            both eps are >= 0.05 (safe in fp32 for costs in [0, 2], i.e. normalised features)
            and the log domain otherwise.
        grad: "envelope" (plans constant in backward) or "unrolled".
        normalize: L2-normalise all features first (set False if already normalised).
        memory_budget: bytes the torch token level may use per chunk of classes.
        class_chunk: force a chunk size (classes per chunk) instead of the budget.
        backend: "auto" (the fused GEMM + Triton kernel on CUDA with Triton whenever it can
            serve the call: kernel domain, eps_token >= 0.03, envelope gradient; else torch),
            "torch", or "fused" (an error when it cannot serve the call, never a silent
            fallback or a dropped gradient).
        check_every: iterations between convergence checks.

    Precision: whatever the input dtype (e.g. bf16 features under autocast), everything after
    the features is fp32: autocast is switched off inside, the features are upcast before they
    are normalised, and the fused path multiplies the given features exactly (fp32 accumulation).
    The two backends therefore agree to ~1e-6 for any input dtype.
    """
    if form not in ("paper", "released"):
        raise ValueError(
            f"form {form!r} unknown; use 'paper' (distance) or 'released' (similarity)"
        )
    if backend not in ("auto", "torch", "fused"):
        raise ValueError(f"backend {backend!r} unknown; use 'auto', 'torch' or 'fused'")
    B, M, J, D = image_tokens.shape
    K, N, L, Dt = text_tokens.shape
    if D != Dt or image_global.shape != (B, M, D) or text_global.shape != (K, N, D):
        raise ValueError(
            "feature shapes disagree: image_global "
            f"{tuple(image_global.shape)}, image_tokens {tuple(image_tokens.shape)}, text_global "
            f"{tuple(text_global.shape)}, text_tokens {tuple(text_tokens.shape)}; expected "
            "[B, M, D], [B, M, J, D], [K, N, D], [K, N, L, D]"
        )
    eps_token = eps if eps_token is None else eps_token
    if domain == "auto":
        domain = "kernel" if min(eps, eps_token) >= KERNEL_DOMAIN_MIN_EPS else "log"
    needs_grad = torch.is_grad_enabled() and (
        image_tokens.requires_grad or text_tokens.requires_grad
    )
    if backend == "fused":
        why = _fused_reason(image_tokens, eps_token, domain)
        if why is None and needs_grad and form == "paper" and grad != "envelope":
            why = f"its backward is the envelope gradient and grad={grad!r} was asked"
        if why is not None:
            raise ValueError(
                f"backend='fused' cannot run here: {why}; use backend='auto' or 'torch'"
            )
        use_fused = True
    elif backend == "auto":
        use_fused = (
            image_tokens.is_cuda
            and _fused_reason(image_tokens, eps_token, domain) is None
            and not (needs_grad and form == "paper" and grad != "envelope")
        )
    else:
        use_fused = False
    max_iter_token = max_iter if max_iter_token is None else max_iter_token
    tol_token = tol if tol_token is None else tol_token

    if text_mask is None:
        if text_lengths is not None:
            text_mask = lengths_to_mask(text_lengths.to(text_tokens.device), L)
        else:
            text_mask = torch.ones(K, N, L, dtype=torch.bool, device=text_tokens.device)
    if text_mask.dim() == 2:
        text_mask = text_mask.unsqueeze(1)
    text_mask = text_mask.expand(K, N, L).bool()

    with torch.autocast(image_tokens.device.type, enabled=False):  # fp32 from here on
        return _hierarchical(
            image_global,
            image_tokens,
            text_global,
            text_tokens,
            text_mask,
            use_fused,
            beta=beta,
            eps=eps,
            eps_token=eps_token,
            max_iter=max_iter,
            max_iter_token=max_iter_token,
            tol=tol,
            tol_token=tol_token,
            form=form,
            domain=domain,
            grad=grad,
            normalize=normalize,
            memory_budget=memory_budget,
            class_chunk=class_chunk,
            check_every=check_every,
        )


def _hierarchical(
    image_global,
    image_tokens,
    text_global,
    text_tokens,
    text_mask,
    use_fused,
    *,
    beta,
    eps,
    eps_token,
    max_iter,
    max_iter_token,
    tol,
    tol_token,
    form,
    domain,
    grad,
    normalize,
    memory_budget,
    class_chunk,
    check_every,
) -> HierarchicalOTResult:
    work = torch.promote_types(image_tokens.dtype, torch.float32)  # fp32, or fp64 if given
    prep = (lambda x: F.normalize(x.to(work), dim=-1)) if normalize else (lambda x: x.to(work))
    global_sim = torch.einsum(
        "bmd,knd->bkmn", prep(image_global), prep(text_global)
    )  # [B, K, M, N]

    if use_fused:
        from . import fused

        if form == "released":  # the token level only moves the plan: no gradient, no plans kept
            image_tokens, text_tokens = image_tokens.detach(), text_tokens.detach()
        tok = fused.token_ot(
            image_tokens,
            text_tokens,
            text_mask,
            eps=eps_token,
            max_iter=max_iter_token,
            tol=tol_token,
            check_every=check_every,
            normalize=normalize,
            memory_budget=memory_budget,
            class_chunk=class_chunk,
        )
        token_distance, token_similarity = tok.distance, tok.similarity.detach()
        token_stats = _stats(tok.converged, tok.n_iter, tok.error, tok.entropy)
    else:
        token_distance, token_similarity, token_stats = _token_level_torch(
            prep(image_tokens),
            prep(text_tokens),
            text_mask,
            eps=eps_token,
            max_iter=max_iter_token,
            tol=tol_token,
            domain=domain,
            grad=grad,
            memory_budget=memory_budget,
            class_chunk=class_chunk,
            check_every=check_every,
            need_grad=form == "paper",
        )

    if form == "paper":
        prompt_cost = (1.0 - global_sim) + beta * token_distance  # [B, K, M, N]
    else:
        prompt_cost = (1.0 - global_sim) + beta * token_similarity.detach()
    outer = sinkhorn(
        prompt_cost,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
        domain=domain,
        grad=grad,
        check_every=check_every,
    )
    if form == "paper":
        score = 1.0 - outer.cost  # [B, K]
    else:
        score = (outer.plan.detach() * global_sim).sum((-2, -1))
    return HierarchicalOTResult(
        score=score,
        prompt_plan=outer.plan,
        prompt_cost=prompt_cost,
        global_sim=global_sim,
        token_distance=token_distance,
        token_similarity=token_similarity,
        token_stats=token_stats,
        prompt_stats=_stats(
            outer.converged,
            outer.n_iter,
            outer.marginal_error,
            plan_entropy_ratio(outer.plan.detach()),
        ),
        backend="fused" if use_fused else "torch",
    )


def _token_level_torch(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    domain: Domain,
    grad: GradMode,
    memory_budget: int,
    class_chunk: int | None,
    check_every: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, OTStats]:
    B, M, J, _ = image_tokens.shape
    K, N, L, _ = text_tokens.shape
    if class_chunk:
        image_chunk, chunk = B, class_chunk
    elif image_tokens.device.type == "cpu":
        image_chunk, chunk = cpu_chunks(B, K, M, N, J, L, memory_budget)
    else:
        image_chunk, chunk = B, class_chunk_size(B, M, N, J, L, memory_budget)
    work = torch.promote_types(image_tokens.dtype, torch.float32)
    r_all = image_tokens.to(work)
    rows = []
    for b0 in range(0, B, image_chunk):
        r = r_all[b0 : b0 + image_chunk]
        rows.append(
            _token_level_chunks(
                r,
                text_tokens,
                text_mask,
                chunk,
                work,
                eps,
                max_iter,
                tol,
                domain,
                grad,
                check_every,
                need_grad,
            )
        )
    dist, sim, conv, iters, err, ent = (torch.cat(xs, dim=0) for xs in zip(*rows))
    return dist, sim, _stats(conv, iters, err, ent)


def _token_level_chunks(
    r, text_tokens, text_mask, chunk, work, eps, max_iter, tol, domain, grad, check_every, need_grad
):
    """Token level of some images ``r`` against every class, ``chunk`` classes at a time."""
    K = text_tokens.shape[0]
    dists, sims, convs, iters, errs, ents = [], [], [], [], [], []
    for k0 in range(0, K, chunk):
        s = text_tokens[k0 : k0 + chunk].to(work)
        # einsum returns a permuted view; make it dense so every later op streams memory
        sim = torch.einsum("bmjd,knld->bkmnjl", r, s).contiguous()  # [b, kc, M, N, J, L]
        mask_b = text_mask[k0 : k0 + chunk][None, :, None]  # [1, kc, 1, N, L]
        res = sinkhorn(
            1.0 - sim,
            eps=eps,
            max_iter=max_iter,
            tol=tol,
            domain=domain,
            grad=grad,
            mask_b=mask_b,
            check_every=check_every,
        )
        dist = res.cost if need_grad else res.cost.detach()  # [B, kc, M, N]
        dists.append(dist)
        sims.append((res.plan.detach() * sim.detach()).sum((-2, -1)))
        convs.append(res.converged)
        iters.append(res.n_iter)
        errs.append(res.marginal_error)
        ents.append(  # from the scalings: no log per entry (padding columns carry no mass)
            entropy_ratio_from_potentials(
                res.plan.detach(), res.cost.detach(), res.log_u.detach(), res.log_v.detach(), eps
            )
        )
    cat = lambda xs: torch.cat(xs, dim=1)  # noqa: E731  (classes are dim 1)
    return cat(dists), cat(sims), cat(convs), cat(iters), cat(errs), cat(ents)
