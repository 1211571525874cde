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

The solver is an object built once (:class:`HierarchicalOT`, from one
:class:`~.options.SinkhornOptions` for the prompt level and one :class:`~.options.TokenOptions`
for the token level, e.g. unbalanced with ``tau``); calling it returns a
:class:`HierarchicalOTResult` with the scores, each level's convergence statistics and, on
request, the plans of both levels. :func:`hierarchical_ot` is the same solve from keyword
arguments.

Classes are processed in chunks so the peak memory stays under ``memory_budget``; results do not
depend on the chunk size or on which images/classes share a call (each problem stops on its own).
Precision: autocast is switched off inside and everything after the features is fp32 (fp64 if
given), so bf16/fp16 features lose nothing beyond their own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from .entropy import entropy_ratio_from_potentials, plan_entropy_ratio
from .options import Backend, SinkhornOptions, TokenOptions
from .sinkhorn import DomainChoice, GradMode, auto_domain

# "paper": the prompt cost adds the token distance, score 1 - <T, C>; "released": the released
# code's transported similarity in the cost, score <T, s>
Form = Literal["paper", "released"]

# fp32 copies of a [.., J, L] token problem alive at once in the torch path (similarities, cost,
# log-kernel, plan, logsumexp temporaries, autograd saves): used to size class chunks.
_TORCH_BYTES_PER_ENTRY = 4 * 8
# token-cost entries per chunk of the torch path on a CPU (4 MiB in fp32): a chunk's kernel, its
# transpose, cost and plan then stay in the last-level cache through the Sinkhorn iterations
# (measured on a 2-core EPYC, ALIGN's training step at batch 32 and its evaluation at 256:
# 1.4x and 2x faster than one chunk of every class)
CPU_CHUNK_ENTRIES = 1 << 20


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
        token_plan: ``[B, K, M, N, J, L]`` token-level plans T_hat (zero on padding columns);
            only when asked for (``plans=True``), else None.
        token_sim: ``[B, K, M, N, J, L]`` the token cosines S those plans transport (with
            ``token_plan``).
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
    token_plan: torch.Tensor | None = None
    token_sim: torch.Tensor | None = None


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


def _fused_reason(image_tokens: torch.Tensor, token: TokenOptions) -> str | None:
    """Why the fused kernel cannot serve this call (None when it can); ``token`` has its
    domain resolved."""
    from . import fused

    if not fused.available():
        return "it needs Triton and a CUDA device (or TRITON_INTERPRET=1)"
    if not (image_tokens.is_cuda or fused.interpreted()):
        return f"the features are on {image_tokens.device}, not CUDA"
    if token.domain != "kernel":
        return f"it works in the kernel domain and domain={token.domain!r} was asked"
    if token.eps < fused.MIN_EPS:
        return f"it needs eps_token >= {fused.MIN_EPS} (got {token.eps})"
    if not token.balanced:
        return f"it solves balanced OT and tau_token={token.tau} was asked"
    if image_tokens.dtype == torch.float64:
        return "it computes in fp32 and the features are fp64"
    return None


@dataclass(frozen=True)
class HierarchicalOT:
    """ALIGN's two-level OT, built once from its options and called on features.

    Attributes:
        prompt: the prompt level's Sinkhorn options.
        token: the token level's options (Sinkhorn settings, backend, chunking).
        beta: weight of the token-level term in the prompt-level cost.
        form: "paper" (distance, gradient through the token level) or "released" (the released
            code: transported similarity added to the cost, score from global cosines only).
        normalize: L2-normalise all features first (False when they already are).

    A level whose domain is "auto" takes the kernel domain when both levels' eps allow it
    (:func:`~.sinkhorn.auto_domain` of the smaller eps: safe in fp32 for the costs in [0, 2] of
    normalised features), else the log domain.
    """

    prompt: SinkhornOptions = SinkhornOptions()
    token: TokenOptions = TokenOptions()
    beta: float = 1.0
    form: Form = "paper"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.form not in ("paper", "released"):
            raise ValueError(
                f"form {self.form!r} unknown; use 'paper' (distance) or 'released' (similarity)"
            )
        if not isinstance(self.prompt, SinkhornOptions) or not isinstance(self.token, TokenOptions):
            raise TypeError("prompt must be SinkhornOptions and token TokenOptions")

    @classmethod
    def from_kwargs(
        cls,
        *,
        beta: float = 1.0,
        eps: float = 0.1,
        eps_token: float | None = None,
        max_iter: int = 100,
        max_iter_token: int | None = None,
        tol: float = 1e-3,
        tol_token: float | None = None,
        tau_token: float | None = None,
        form: Form = "paper",
        domain: DomainChoice = "auto",
        grad: GradMode = "envelope",
        normalize: bool = True,
        memory_budget: int = 2 * 1024**3,
        class_chunk: int | None = None,
        backend: Backend = "auto",
        check_every: int = 5,
    ) -> HierarchicalOT:
        """The solver :func:`hierarchical_ot`'s keywords describe (see there)."""
        shared = dict(domain=domain, grad=grad, check_every=check_every)
        return cls(
            prompt=SinkhornOptions(eps=eps, max_iter=max_iter, tol=tol, **shared),
            token=TokenOptions(
                eps=eps if eps_token is None else eps_token,
                max_iter=max_iter if max_iter_token is None else max_iter_token,
                tol=tol if tol_token is None else tol_token,
                tau=tau_token,
                backend=backend,
                memory_budget=memory_budget,
                class_chunk=class_chunk,
                **shared,
            ),
            beta=beta,
            form=form,
            normalize=normalize,
        )

    def to_kwargs(self) -> dict[str, Any]:
        """The :func:`hierarchical_ot` keywords that build this solver (for records and
        reports); the levels must share domain, gradient mode and check schedule, and the prompt
        level be balanced, as the keywords cannot say otherwise."""
        p, t = self.prompt, self.token
        if (p.domain, p.grad, p.check_every, p.tau) != (t.domain, t.grad, t.check_every, None):
            raise ValueError(
                "the levels differ in domain, grad or check_every, or the prompt level is "
                "unbalanced: no hierarchical_ot keywords describe this solver"
            )
        return dict(
            beta=self.beta,
            eps=p.eps,
            eps_token=t.eps,
            max_iter=p.max_iter,
            max_iter_token=t.max_iter,
            tol=p.tol,
            tol_token=t.tol,
            tau_token=t.tau,
            form=self.form,
            domain=p.domain,
            grad=p.grad,
            normalize=self.normalize,
            memory_budget=t.memory_budget,
            class_chunk=t.class_chunk,
            backend=t.backend,
            check_every=p.check_every,
        )

    def levels(self) -> tuple[SinkhornOptions, TokenOptions]:
        """Both levels' options with "auto" domains resolved (see the class docstring)."""
        shared = auto_domain(min(self.prompt.eps, self.token.eps))
        return self.prompt.with_domain(shared), self.token.with_domain(shared)

    # data-dependent early stopping and the Triton kernel: never traced by torch.compile
    @torch.compiler.disable
    def __call__(
        self,
        image_global: torch.Tensor,
        image_tokens: torch.Tensor,
        text_global: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        text_lengths: torch.Tensor | None = None,
        plans: bool = False,
    ) -> HierarchicalOTResult:
        """Score every (image, class) pair.

        Args:
            image_global: ``[B, M, D]`` global image features (one per visual prompt set).
            image_tokens: ``[B, M, J, D]`` image token features (patches + visual prompts).
            text_global: ``[K, N, D]`` global text features (one per text prompt set).
            text_tokens: ``[K, N, L, D]`` text token features, padded to L.
            text_mask: ``[K, N, L]`` or ``[K, L]`` bool, True for real tokens; or give
                ``text_lengths`` (``[K]`` or ``[K, N]``). Default: all L tokens are real.
            plans: also return the token-level plans and cosines (``[B, K, M, N, J, L]``
                each); they are computed by the torch path (the fused kernel keeps none), which
                the fused kernel matches to ~1e-6.

        Precision: whatever the input dtype (e.g. bf16 features under autocast), everything
        after the features is fp32: autocast is switched off inside, the features are upcast
        before they are normalised, and the fused path multiplies the given features exactly
        (fp32 accumulation). The two backends therefore agree to ~1e-6 for any input dtype.
        """
        B, M, J, D = image_tokens.shape
        K, N, L, Dt = text_tokens.shape
        if D != Dt or image_global.shape != (B, M, D) or text_global.shape != (K, N, D):
            raise ValueError(
                "feature shapes disagree: image_global "
                f"{tuple(image_global.shape)}, image_tokens {tuple(image_tokens.shape)}, "
                f"text_global {tuple(text_global.shape)}, text_tokens "
                f"{tuple(text_tokens.shape)}; expected [B, M, D], [B, M, J, D], [K, N, D], "
                "[K, N, L, D]"
            )
        prompt, token = self.levels()
        needs_grad = torch.is_grad_enabled() and (
            image_tokens.requires_grad or text_tokens.requires_grad
        )
        use_fused = not plans and self._use_fused(image_tokens, token, needs_grad)
        if text_mask is None:
            if text_lengths is not None:
                text_mask = lengths_to_mask(text_lengths.to(text_tokens.device), L)
            else:
                text_mask = torch.ones(K, N, L, dtype=torch.bool, device=text_tokens.device)
        if text_mask.dim() == 2:
            text_mask = text_mask.unsqueeze(1)
        text_mask = text_mask.expand(K, N, L).bool()
        with torch.autocast(image_tokens.device.type, enabled=False):  # fp32 from here on
            return self._solve(
                prompt,
                token,
                image_global,
                image_tokens,
                text_global,
                text_tokens,
                text_mask,
                use_fused,
                plans,
            )

    def _use_fused(self, image_tokens: torch.Tensor, token: TokenOptions, needs_grad: bool) -> bool:
        """Whether the fused kernel computes the token level (``backend`` "fused": an error
        naming the reason when it cannot)."""
        grad_reason = None
        if needs_grad and self.form == "paper" and token.grad != "envelope":
            grad_reason = f"its backward is the envelope gradient and grad={token.grad!r} was asked"
        if token.backend == "fused":
            why = _fused_reason(image_tokens, token) or grad_reason
            if why is not None:
                raise ValueError(
                    f"backend='fused' cannot run here: {why}; use backend='auto' or 'torch'"
                )
            return True
        if token.backend == "auto":
            return (
                image_tokens.is_cuda
                and _fused_reason(image_tokens, token) is None
                and grad_reason is None
            )
        return False

    def _solve(
        self,
        prompt: SinkhornOptions,
        token: TokenOptions,
        image_global: torch.Tensor,
        image_tokens: torch.Tensor,
        text_global: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        use_fused: bool,
        plans: bool,
    ) -> HierarchicalOTResult:
        work = torch.promote_types(image_tokens.dtype, torch.float32)  # fp32, or fp64 if given
        if self.normalize:
            prep = lambda x: F.normalize(x.to(work), dim=-1)  # noqa: E731
        else:
            prep = lambda x: x.to(work)  # noqa: E731
        global_sim = torch.einsum(
            "bmd,knd->bkmn", prep(image_global), prep(text_global)
        )  # [B, K, M, N]
        paper = self.form == "paper"

        if use_fused:
            from . import fused

            if not paper:  # the token level only moves the plan: no gradient, no plans kept
                image_tokens, text_tokens = image_tokens.detach(), text_tokens.detach()
            tok = fused.token_ot(
                image_tokens, text_tokens, text_mask, token, normalize=self.normalize
            )
            level = _TokenLevel(
                tok.distance,
                tok.similarity.detach(),
                _stats(tok.converged, tok.n_iter, tok.error, tok.entropy),
            )
        else:
            level = _token_level_torch(
                prep(image_tokens), prep(text_tokens), text_mask, token, paper, plans
            )

        if paper:
            prompt_cost = (1.0 - global_sim) + self.beta * level.distance  # [B, K, M, N]
        else:
            prompt_cost = (1.0 - global_sim) + self.beta * level.similarity.detach()
        outer = prompt.solve(prompt_cost)
        if paper:
            score = 1.0 - outer.cost  # [B, K]
        else:
            score = (outer.plan.detach() * global_sim).sum((-2, -1))
        return HierarchicalOTResult(
            score=score,
            prompt_plan=outer.plan,
            prompt_cost=prompt_cost,
            global_sim=global_sim,
            token_distance=level.distance,
            token_similarity=level.similarity,
            token_stats=level.stats,
            prompt_stats=_stats(
                outer.converged,
                outer.n_iter,
                outer.marginal_error,
                plan_entropy_ratio(outer.plan.detach()),
            ),
            backend="fused" if use_fused else "torch",
            token_plan=level.plan,
            token_sim=level.sim,
        )


def hierarchical_ot(
    image_global: torch.Tensor,
    image_tokens: torch.Tensor,
    text_global: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    *,
    text_lengths: torch.Tensor | None = None,
    plans: bool = False,
    **options: Any,
) -> HierarchicalOTResult:
    """Score every (image, class) pair with ALIGN's two-level OT, the solver given as keywords
    (``HierarchicalOT.from_kwargs(**options)(...)``; build the solver once where it is called
    repeatedly).

    Args:
        image_global, image_tokens, text_global, text_tokens, text_mask, text_lengths, plans:
            as :meth:`HierarchicalOT.__call__`.
        **options: the solver's settings (defaults in brackets):
            beta (1.0): weight of the token-level term in the prompt-level cost;
            eps (0.1), eps_token (eps): entropic regularisation of the prompt / token level;
            max_iter (100), max_iter_token, tol (1e-3), tol_token: Sinkhorn limits per level
            (tol on the L1 marginal error; the token level defaults to the prompt level's);
            tau_token (None): KL relaxation of the token-level marginals (unbalanced OT);
            form ("paper"): "paper" or "released" (see the module docstring);
            domain ("auto"): "log", "kernel", or "auto" (kernel when both eps are >= 0.05);
            grad ("envelope"): "envelope" (plans constant in backward) or "unrolled";
            normalize (True): L2-normalise all features first;
            memory_budget (2 GiB): bytes the torch token level may use per chunk of classes;
            class_chunk (None): force classes per chunk instead of the budget;
            backend ("auto"): the fused GEMM + Triton kernel on CUDA wherever it can serve the
            call (balanced, kernel domain, eps_token >= 0.03, envelope gradient), else torch;
            "torch"; or "fused" (an error when it cannot serve the call);
            check_every (5): iterations between convergence checks.
    """
    solver = HierarchicalOT.from_kwargs(**options)
    return solver(
        image_global,
        image_tokens,
        text_global,
        text_tokens,
        text_mask,
        text_lengths=text_lengths,
        plans=plans,
    )


class _TokenLevel(NamedTuple):
    distance: torch.Tensor  # [B, K, M, N] <T_hat, 1 - S>
    similarity: torch.Tensor  # [B, K, M, N] <T_hat, S>
    stats: OTStats
    plan: torch.Tensor | None = None  # [B, K, M, N, J, L] when asked for
    sim: torch.Tensor | None = None  # [B, K, M, N, J, L] when asked for


def _token_level_torch(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    options: TokenOptions,
    need_grad: bool,
    plans: bool,
) -> _TokenLevel:
    """The token level of every (image, class) pair, in chunks of images and classes."""
    B, M, J, _ = image_tokens.shape
    K, N, L, _ = text_tokens.shape
    if options.class_chunk:
        image_chunk, chunk = B, options.class_chunk
    elif image_tokens.device.type == "cpu":
        image_chunk, chunk = cpu_chunks(B, K, M, N, J, L, options.memory_budget)
    else:
        image_chunk, chunk = B, class_chunk_size(B, M, N, J, L, options.memory_budget)
    work = torch.promote_types(image_tokens.dtype, torch.float32)
    r_all = image_tokens.to(work)
    rows = []
    for b0 in range(0, B, image_chunk):
        r = r_all[b0 : b0 + image_chunk]
        rows.append(
            _token_level_chunks(r, text_tokens, text_mask, chunk, work, options, need_grad, plans)
        )
    parts = [torch.cat(xs, dim=0) if xs[0] is not None else None for xs in zip(*rows)]
    dist, sim, conv, iters, err, ent, plan, token_sim = parts
    return _TokenLevel(dist, sim, _stats(conv, iters, err, ent), plan, token_sim)


def _token_level_chunks(
    r: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    chunk: int,
    work: torch.dtype,
    options: TokenOptions,
    need_grad: bool,
    plans: bool,
) -> list[torch.Tensor | None]:
    """Token level of some images ``r`` against every class, ``chunk`` classes at a time."""
    K = text_tokens.shape[0]
    outs: list[list[torch.Tensor]] = [[] for _ in range(8)]
    for k0 in range(0, K, chunk):
        s = text_tokens[k0 : k0 + chunk].to(work)
        # einsum returns a permuted view; make it dense so every later op streams memory
        sim = torch.einsum("bmjd,knld->bkmnjl", r, s).contiguous()  # [b, kc, M, N, J, L]
        mask_b = text_mask[k0 : k0 + chunk][None, :, None]  # [1, kc, 1, N, L]
        res = options.solve(1.0 - sim, mask_b=mask_b)
        plan = res.plan.detach()
        found = [
            res.cost if need_grad else res.cost.detach(),  # [b, kc, M, N]
            (plan * sim.detach()).sum((-2, -1)),
            res.converged,
            res.n_iter,
            res.marginal_error,
            # from the scalings: no log per entry (padding columns carry no mass)
            entropy_ratio_from_potentials(
                plan, res.cost.detach(), res.log_u.detach(), res.log_v.detach(), options.eps
            ),
        ]
        if plans:
            found += [plan, sim.detach()]
        for out, x in zip(outs, found):
            out.append(x)
    # classes are dim 1
    return [torch.cat(xs, dim=1) if xs else None for xs in outs]
