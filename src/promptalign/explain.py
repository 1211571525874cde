"""See what the prompts learned: transport plans, patch heat maps, score decompositions, embeddings.

The library half of ``promptalign explain`` (drawing lives in :mod:`promptalign.viz`): everything
here returns arrays and numbers.

For a method that scores with an OT head (PLOT and ALIGN: their forward attaches
:class:`~promptalign.methods.explainable.ExplainFeatures` to its output) the head that scored
recomputes its plans from the features it scored, for the classes shown (``head.plans``), and the
logits rebuilt from them equal the method's (the tests hold this to 1e-5); this module holds no
OT code:

* prompt level: the M x N plan T between the visual and text prompt sets of an (image, class);
* token level (hierarchical OT, ALIGN): the J x L plan between the image tokens (patches + visual
  prompt tokens) and the class prompt's text tokens for every pair (m, n); its patch rows, put
  back on the patch grid, are one heat map per text token (mass of that token per patch), and the
  mass per word sums its word pieces;
* score decomposition per pair: ``scale * T_mn * cos_mn`` (global) and ``-scale * beta * T_mn *
  <T_hat, 1 - S>`` (token term, paper form; the released form's token term moves the plan only),
  summing to the logit.

Methods without the hook (one prompt per modality: CoOp, MaPLe, ...) are explained by the cosine
of each patch token of their image tower with the class feature, recorded while the method itself
scores the image.

The modes view (the ALIGN paper's qualitative figure: do the M visual prompt sets look at
different parts of an image?) is :func:`set_maps` of an explained class: one patch map per visual
prompt set m, each the plan-weighted mean over the text sets n of a per-patch score of the pair
(m, n) - the token-level match ``patch_match`` (hierarchical OT: the mass-weighted cosine of each
patch with the class's text tokens its mass goes to) or, without a token level, the patch cosine
with the class feature. Beside it, how far apart the sets' global features are
(:func:`mean_pairwise_distance`: per image over its M visual sets, per class over its N text sets;
:func:`set_separation` averages them over a dataset split).

Plan entropies are reported relative to the uniform coupling (:func:`plan_entropy_ratio`, 1.0 =
uniform, i.e. the OT does nothing). Following the ALIGN paper's qualitative analysis (Wang et al.,
NeurIPS 2023, arXiv 2309.13847: transport plans between patches and words, t-SNE of the image
embeddings per prompt set), :func:`embed_dataset` projects a dataset's image embeddings per visual
prompt set to 2-D (t-SNE with scikit-learn, PCA without).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .methods.explainable import ExplainFeatures, plan_entropies, plan_entropy_ratio

log = logging.getLogger(__name__)

Panels = Literal["auto", "ot", "cosine"]


class ExplainError(ValueError):
    """A bad input to explain (not an image, unknown class, OT asked of a method without OT)."""


# --------------------------------------------------------------------------- results
@dataclass
class TokenLabels:
    """Readable labels of one class prompt's tokens that take part in the token-level OT.

    Attributes:
        tokens: one label per token: decoded word piece, "<sos>" / "<eot>" for the special tokens,
            "[ctx1]".. for learnable context slots.
        kinds: "special", "context" or "text" per token.
        words: the tokens grouped into words (word pieces joined, special and context tokens
            each a word of their own).
        word_of_token: index into ``words`` for every token.
    """

    tokens: list[str]
    kinds: list[str]
    words: list[str]
    word_of_token: list[int]

    def word_mass(self, token_mass: np.ndarray) -> np.ndarray:
        """Sum ``[..., L]`` token masses into ``[..., n_words]`` word masses."""
        out = np.zeros(token_mass.shape[:-1] + (len(self.words),), dtype=np.float64)
        for t, w in enumerate(self.word_of_token):
            out[..., w] += token_mass[..., t]
        return out


@dataclass
class ClassExplanation:
    """One (image, class): plans, maps and the score decomposition (numpy arrays).

    Attributes:
        name, index: the class.
        logit: the logit rebuilt from the recomputed plans (OT methods) or the method's own.
        method_logit: the logit ``method.logits`` gives.
        prob: softmax probability over all classes.
        prompt_plan: ``[M, N]`` prompt-level plan (None without OT).
        global_sim: ``[M, N]`` cosine of the global features of every (visual set, text set).
        token_term: ``[M, N]`` token-level OT quantity in the prompt cost (ALIGN: the transported
            distance ``<T_hat, 1 - S>`` in the paper form, similarity ``<T_hat, S>`` in the
            released).
        prompt_cost: ``[M, N]`` prompt-level cost.
        logit_global, logit_token: ``[M, N]`` parts of the logit per pair; their sum plus
            ``logit_extra`` is ``logit``.
        logit_extra: logit the method adds outside the OT (0.0 when none).
        token_plans: ``[M, N, J, L]`` token-level plans (ALIGN; zero on padding columns).
        heat: ``[M, N, L, gh, gw]`` token-level mass per patch for every text token.
        prompt_token_mass: ``[M, N, L]`` mass each text token sends to the visual prompt tokens.
        word_mass: ``[M, N, W_n]`` per n (list over n): mass per word of text set n's prompt.
        word_cosine: like ``word_mass``: mass-weighted cosine of each word with the image tokens
            its mass goes to (which words the image matches; the token similarity
            ``<T_hat, S>`` is the sum of word_mass x word_cosine).
        tokens: per text set n, :class:`TokenLabels` of its prompt (None without token level).
        patch_cosine: ``[M, N, gh, gw]`` cosine of every patch token of visual set m with the
            global class feature of text set n (cosine view, every method).
        patch_match: ``[M, N, gh, gw]`` token-level match per patch (hierarchical OT): the
            mass-weighted cosine of each patch with the text tokens its token-level mass goes to,
            ``sum_l T_hat[p, l] S[p, l] / sum_l T_hat[p, l]``.
        text_set_distance: mean pairwise cosine distance between the class's N global text
            features (0.0 for one set; :func:`mean_pairwise_distance`).
        entropy: plan entropy ratios: "prompt" (scalar), "token" (``[M, N]``).
    """

    name: str
    index: int
    logit: float
    method_logit: float
    prob: float
    global_sim: np.ndarray
    patch_cosine: np.ndarray | None = None
    prompt_plan: np.ndarray | None = None
    token_term: np.ndarray | None = None
    prompt_cost: np.ndarray | None = None
    logit_global: np.ndarray | None = None
    logit_token: np.ndarray | None = None
    logit_extra: float = 0.0
    token_plans: np.ndarray | None = None
    heat: np.ndarray | None = None
    prompt_token_mass: np.ndarray | None = None
    word_mass: list[np.ndarray] | None = None
    word_cosine: list[np.ndarray] | None = None
    tokens: list[TokenLabels] | None = None
    patch_match: np.ndarray | None = None
    text_set_distance: float = 0.0
    entropy: dict[str, Any] = field(default_factory=dict)

    def dominant_pairs(self, k: int = 1) -> list[tuple[int, int]]:
        """The ``k`` (m, n) pairs carrying the most prompt-level mass (all pairs' order without
        OT)."""
        plan = self.prompt_plan if self.prompt_plan is not None else self.global_sim
        order = np.argsort(-plan.ravel(), kind="stable")[:k]
        return [tuple(int(i) for i in np.unravel_index(o, plan.shape)) for o in order]

    def line(self) -> str:
        """One line: the logit, with OT its decomposition (global + token + other) and the plan
        entropies, and the best-matched words of the dominant (visual set, text set) pair."""
        line = f"  {self.name}: logit {self.logit:.2f}"
        if self.prompt_plan is not None:
            line += f" = global {self.logit_global.sum():.2f} + token {self.logit_token.sum():.2f}"
            line += f" + other {self.logit_extra:.2f}" if self.logit_extra else ""
            line += f"; prompt plan entropy {self.entropy['prompt']:.3f} of uniform"
            line += f" (floor {self.entropy['prompt_floor_ratio']:.3f})"
        if "token" in self.entropy:
            m, n = self.dominant_pairs(1)[0]
            cos = self.word_cosine[n][m]
            words = sorted(zip(self.tokens[n].words, cos), key=lambda t: -t[1])[:3]
            line += (
                f"; token plans {self.entropy['token'].mean():.3f} of uniform; best-matched words "
                f"(pair v{m}-t{n}, cosine) " + ", ".join(f"{w} {x:.2f}" for w, x in words)
            )
        return line


@dataclass
class ImageExplanation:
    """Explanations of one image.

    Attributes:
        path: the image file.
        image: ``[H, W, 3]`` uint8, the image as the model sees it (resized and cropped).
        grid: (rows, cols) of the patch grid.
        top: (class name, probability) of the top classes.
        classes: one :class:`ClassExplanation` per explained class (top classes, then chosen ones).
        image_set_distance: mean pairwise cosine distance between the image's M global features
            (one per visual prompt set; 0.0 for one set).
    """

    path: str
    image: np.ndarray
    grid: tuple[int, int]
    top: list[tuple[str, float]]
    classes: list[ClassExplanation]
    image_set_distance: float = 0.0

    def lines(self, modes: bool = False) -> list[str]:
        """The image's top classes, then one line per explained class (and with ``modes`` its
        :meth:`modes_caption`)."""
        top = f"{self.path}: top " + ", ".join(f"{n} ({p:.2f})" for n, p in self.top)
        rows = [top]
        for c in self.classes:
            rows.append(c.line())
            if modes:
                rows.append(f"    modes: {self.modes_caption(c)}")
        return rows

    def modes_caption(self, c: ClassExplanation) -> str:
        """The caption of one row of the modes view: the prompt plan's entropy (ratio to
        uniform, 1 = uniform) and how far apart the prompt sets are."""
        M, N = c.patch_cosine.shape[:2]
        if c.prompt_plan is not None:
            ent = c.entropy["prompt"]
            floor = c.entropy.get("prompt_floor_ratio", 0.5)
            plan = (
                f"prompt plan entropy {ent:.5f} of uniform (1 = uniform, i.e. a plain average of "
                f"the {M} x {N} pairs; {floor:.2f} = one text set per visual set)"
            )
        else:
            plan = "no prompt-level plan"
        return (
            f"{c.name} (p={c.prob:.2f}): {plan}; mean pairwise cosine distance of the sets' "
            f"global features: image {self.image_set_distance:.2e}, text "
            f"{c.text_set_distance:.2e}"
        )


@dataclass
class Explanation:
    """Everything ``explain`` found for a run and a list of images.

    Attributes:
        method: the run's method name; scorer: "hierarchical_ot", "prompt_set_ot" or "cosine".
        panels: "ot" or "cosine", the view computed.
        options: the scorer options used.
        images: one :class:`ImageExplanation` per image.
    """

    method: str
    scorer: str
    panels: str
    options: dict[str, Any]
    images: list[ImageExplanation]

    def header(self) -> str:
        """The method, its scorer and options, and the view computed, in one line."""
        opts = ", ".join(f"{k} {v}" for k, v in self.options.items())
        return f"{self.method} ({self.scorer}{': ' + opts if opts else ''}); {self.panels} panels"

    def summary_lines(self) -> list[str]:
        """:meth:`summary` as lines."""
        return [
            f"mean {level.replace('_', ' ')}: {value:.3f} (1.0 = uniform plan)"
            for level, value in self.summary().items()
        ]

    def summary(self) -> dict[str, Any]:
        """Plan entropy ratios averaged over every explained (image, class)."""
        prompt = [
            c.entropy["prompt"] for im in self.images for c in im.classes if "prompt" in c.entropy
        ]
        token = [
            float(np.mean(c.entropy["token"]))
            for im in self.images
            for c in im.classes
            if "token" in c.entropy
        ]
        out: dict[str, Any] = {}
        if prompt:
            out["prompt_entropy_ratio"] = float(np.mean(prompt))
        if token:
            out["token_entropy_ratio"] = float(np.mean(token))
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready numbers (images as paths, arrays as nested lists)."""

        def conv(x: Any) -> Any:
            if isinstance(x, np.ndarray):
                return np.round(x.astype(np.float64), 7).tolist()
            if isinstance(x, (np.floating, np.integer)):
                return x.item()
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            if isinstance(x, TokenLabels):
                return {
                    "tokens": x.tokens,
                    "kinds": x.kinds,
                    "words": x.words,
                    "word_of_token": x.word_of_token,
                }
            return x

        images = []
        for im in self.images:
            classes = []
            for c in im.classes:
                d = {k: conv(v) for k, v in c.__dict__.items() if k != "token_plans"}
                d["dominant_pair"] = list(c.dominant_pairs(1)[0])
                classes.append(d)
            images.append(
                {
                    "path": im.path,
                    "grid": list(im.grid),
                    "image_set_distance": im.image_set_distance,
                    "top": [{"label": n, "prob": p} for n, p in im.top],
                    "classes": classes,
                }
            )
        return {
            "method": self.method,
            "scorer": self.scorer,
            "panels": self.panels,
            "options": conv(self.options),
            "entropy": self.summary(),
            "images": images,
        }


# --------------------------------------------------------------------------- tokens
def decode_tokens(tokenizer: Any, ids: Sequence[int], context: Sequence[bool]) -> TokenLabels:
    """Readable labels for token ``ids`` of a CLIP BPE tokenizer (open_clip ``SimpleTokenizer``):
    word pieces decoded to text and joined into words at their end-of-word marks; the start and
    end tokens and the learnable context slots (``context``) labelled."""
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    tokens, kinds, words, word_of = [], [], [], []
    open_word = False
    n_ctx = 0
    for i, is_ctx in zip(ids, context):
        i = int(i)
        if is_ctx or i in (sot, eot):
            if is_ctx:
                n_ctx += 1
                label, kind = f"[ctx{n_ctx}]", "context"
            else:
                label, kind = ("<sos>" if i == sot else "<eot>"), "special"
            tokens.append(label)
            kinds.append(kind)
            words.append(label)
            word_of.append(len(words) - 1)
            open_word = False
            continue
        if decoder is not None and byte_decoder is not None and i in decoder:
            piece = decoder[i]
            ends = piece.endswith("</w>")
            piece = piece[: -len("</w>")] if ends else piece
            text = bytearray(byte_decoder[ch] for ch in piece).decode("utf-8", errors="replace")
        else:  # a tokenizer without the BPE tables: decode one id at a time
            text, ends = tokenizer.decode([i]).strip(), True
        tokens.append(text)
        kinds.append("text")
        if open_word:
            words[-1] += text
        else:
            words.append(text)
        word_of.append(len(words) - 1)
        open_word = not ends
    return TokenLabels(tokens, kinds, words, word_of)


# --------------------------------------------------------------------------- helpers
def _grid(backbone) -> tuple[int, int]:
    grid = getattr(backbone.clip.visual, "grid_size", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    side = round(backbone.n_patches**0.5)
    return side, backbone.n_patches // side


def _patch_index(n_tokens: int, prompt_slice: slice | None, n_patches: int) -> torch.Tensor:
    """Indices of the patch tokens among the J non-CLS tokens (prompt tokens left out)."""
    keep = torch.ones(n_tokens, dtype=torch.bool)
    if prompt_slice is not None:
        keep[prompt_slice] = False
    idx = keep.nonzero().squeeze(1)
    if idx.numel() != n_patches:
        raise ExplainError(
            f"found {idx.numel()} patch tokens, expected {n_patches}; the method's image tokens do "
            "not follow the backbone's patch grid"
        )
    return idx


@contextlib.contextmanager
def _record_image_tower(backbone):
    """Record every image-tower output (with its tokens) while a method scores images."""
    calls: list[Any] = []
    original = backbone.forward_image

    def recording(images, *args, **kwargs):
        kwargs["return_tokens"] = True
        out = original(images, *args, **kwargs)
        calls.append(out)
        return out

    backbone.forward_image = recording  # instance attribute, shadows the method
    try:
        yield calls
    finally:
        del backbone.forward_image


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def has_ot(method) -> bool:
    """True when the method scores with an OT head whose plans it exposes
    (:class:`~promptalign.methods.explainable.ExplainsOT`: an ``explain_features`` method)."""
    return callable(getattr(method, "explain_features", None))


# --------------------------------------------------------------------------- explain
def explain_images(
    method,
    images: torch.Tensor,
    *,
    paths: Sequence[str] | None = None,
    display: Sequence[np.ndarray] | None = None,
    classes: Sequence[str] = (),
    topk: int = 2,
    panels: Panels = "auto",
    modes: bool = False,
) -> Explanation:
    """Explain a method's scores for preprocessed ``images [B, 3, H, W]``.

    Args:
        method: a :class:`~promptalign.methods.PromptMethod` (put in eval mode here).
        images: preprocessed images on the method's device.
        paths, display: file names and ``[H, W, 3]`` uint8 pictures for the result (optional).
        classes: class names explained for every image besides its top ``topk``.
        topk: how many of each image's top classes to explain.
        panels: "ot" (plans; an error for a method without OT), "cosine" (patch cosine maps) or
            "auto" (OT when the method has it).
        modes: the result is for the modes view (:func:`set_maps`): an error for a method
            without prompt sets scored by OT.

    Raises:
        ExplainError: unknown class names, "ot" or ``modes`` for a method without transport
            plans.
    """
    if panels not in ("auto", "ot", "cosine"):
        raise ExplainError(f"panels {panels!r} unknown; use 'auto', 'ot' or 'cosine'")
    _check_topk(topk, classes)
    name = getattr(method, "registered_name", "") or type(method).__name__
    if panels == "ot" and not has_ot(method):
        raise ExplainError(
            f"method {name!r} scores with one prompt per modality and has no transport plans; "
            "use --panels cosine (or auto) for its patch-cosine maps"
        )
    if modes and not has_ot(method):
        raise ExplainError(
            f"method {name!r} has one prompt per modality and no prompt-level plan; the modes "
            "view needs a method with several prompt sets scored by OT (ALIGN, PLOT)"
        )
    unknown = [c for c in classes if c not in method.classnames]
    if unknown:
        raise ExplainError(
            f"unknown class(es) {unknown}; the run's classes are: {', '.join(method.classnames)}"
        )
    use_ot = panels != "cosine" and has_ot(method)
    method.eval()
    backbone = method.backbone
    grid = _grid(backbone)
    n_patch = grid[0] * grid[1]
    B = images.shape[0]
    with torch.no_grad():
        with _record_image_tower(backbone) as calls:  # the image tokens too, for the maps
            out = method(images)
        method_logits = out.logits.float()
        probs = method_logits.softmax(-1)
        feats = out.explain if has_ot(method) else None  # what the method's OT head scored
    top_k = min(max(topk, 0), method.num_classes)
    chosen = [method.classnames.index(c) for c in classes]

    if feats is not None:
        image_tokens, prompt_slice = feats.image_tokens, feats.prompt_slice
        text_global = feats.text_global  # [K, N, D]
        scorer, options = feats.scorer, dict(feats.options)
    else:
        rec = [c for c in calls if c.tokens is not None and c.tokens.shape[0] == B]
        if not rec:
            raise ExplainError(f"method {name!r} did not run the image tower on the images")
        last = rec[-1]
        image_tokens = last.tokens if last.tokens.dim() == 4 else last.tokens.unsqueeze(1)
        prompt_slice = last.prompt_slice
        tf = out.text_features  # [K, D] or per image [B, K, D]
        text_global = tf.unsqueeze(-2)  # [(B,) K, 1, D]
        scorer, options = "cosine", {}
    patch_idx = _patch_index(image_tokens.shape[-2], prompt_slice, n_patch).to(image_tokens.device)
    patches = F.normalize(image_tokens[..., patch_idx, :].float(), dim=-1)  # [B, M, G, D]

    results = []
    for b in range(B):
        order = torch.argsort(probs[b], descending=True, stable=True).tolist()
        wanted = list(dict.fromkeys(order[:top_k] + chosen))
        idx = torch.tensor(wanted, device=images.device)
        tg = text_global[b] if text_global.dim() == 4 else text_global  # [K, N, D]
        tg = F.normalize(tg[idx].float(), dim=-1)  # [k, N, D]
        cos_maps = torch.einsum("mgd,knd->kmng", patches[b], tg)  # [k, M, N, G]
        cos_maps = cos_maps.reshape(*cos_maps.shape[:3], *grid)
        ot_res = None
        if use_ot:
            ot_res = feats.head.plans(_single(feats, b), idx)
        class_out = []
        image_global = F.normalize(_image_global(feats, out, b), dim=-1)  # [M, D]
        for j, k in enumerate(wanted):
            ce = ClassExplanation(
                name=method.classnames[k],
                index=k,
                logit=float(method_logits[b, k]),
                method_logit=float(method_logits[b, k]),
                prob=float(probs[b, k]),
                global_sim=_np(torch.einsum("md,nd->mn", image_global, tg[j])),
                patch_cosine=_np(cos_maps[j]),
                text_set_distance=float(mean_pairwise_distance(tg[j])),
            )
            if ot_res is not None:
                _fill_ot(ce, ot_res, j, feats, b, k, patch_idx, grid, backbone.tokenizer)
            class_out.append(ce)
        results.append(
            ImageExplanation(
                path=str(paths[b]) if paths is not None else f"image{b}",
                image=display[b]
                if display is not None
                else np.zeros((*backbone.preprocess.image_size, 3), np.uint8),
                grid=grid,
                top=[(method.classnames[k], float(probs[b, k])) for k in order[:top_k]],
                classes=class_out,
                image_set_distance=float(mean_pairwise_distance(image_global)),
            )
        )
    return Explanation(
        name,
        scorer if use_ot or feats is None else "cosine",
        "ot" if use_ot else "cosine",
        options if use_ot else {},
        results,
    )


def _check_topk(topk: int, classes: Sequence[str]) -> None:
    """``topk`` >= 1, or 0 when ``classes`` name what to explain."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < (0 if classes else 1):
        raise ExplainError(
            f"topk {topk!r} must be an integer >= 1 (or 0 together with classes to explain "
            "only those)"
        )


def _single(feats: ExplainFeatures, b: int) -> ExplainFeatures:
    """The features of image ``b`` only (the plans of one image do not depend on the others)."""
    sl = slice(b, b + 1)
    return dataclasses.replace(
        feats,
        image_global=feats.image_global[sl],
        image_tokens=feats.image_tokens[sl] if feats.image_tokens is not None else None,
        extra_logits=feats.extra_logits[sl] if feats.extra_logits is not None else None,
    )


def _image_global(feats: ExplainFeatures | None, out, b: int) -> torch.Tensor:
    """``[M, D]`` global image features of image ``b`` (one set for methods without the hook)."""
    if feats is not None:
        return feats.image_global[b].float()
    return out.image_features[b].float().unsqueeze(0)


def _fill_ot(
    ce: ClassExplanation,
    res: dict,
    j: int,
    feats: ExplainFeatures,
    b: int,
    k: int,
    patch_idx: torch.Tensor,
    grid: tuple[int, int],
    tokenizer,
) -> None:
    extra = float(feats.extra_logits[b, k]) if feats.extra_logits is not None else 0.0
    plan = res["plan"][0, j]  # [M, N]
    ce.prompt_plan = _np(plan)
    ce.global_sim = _np(res["global_sim"][0, j])
    ce.prompt_cost = _np(res["cost"][0, j])
    ce.logit_global = _np(res["logit_global"][0, j])
    ce.logit_token = _np(res["logit_token"][0, j])
    ce.logit_extra = extra
    ce.logit = float(res["logits"][0, j]) + extra
    ce.entropy["prompt"] = float(plan_entropy_ratio(plan))
    h, hu, hmin = plan_entropies(plan)
    ce.entropy["prompt_nats"] = float(h)
    ce.entropy["prompt_uniform_nats"] = float(hu)
    ce.entropy["prompt_floor_ratio"] = float(hmin / hu) if float(hu) > 0 else 1.0
    if "token_plans" not in res:
        return
    ce.token_term = _np(res["token_term"][0, j])
    tp = res["token_plans"][0, j]  # [M, N, J, L]
    mask = feats.text_mask[k].bool()  # [N, L]
    ce.token_plans = _np(tp)
    M, N, _J, L = tp.shape
    heat = tp[:, :, patch_idx, :]  # [M, N, G, L]
    ce.heat = _np(heat.permute(0, 1, 3, 2).reshape(M, N, L, *grid))
    ce.prompt_token_mass = _np(tp.sum(-2) - heat.sum(-2))
    # token-level match per patch: cosines of the tokens the plans transport (no OT here)
    r = F.normalize(feats.image_tokens[b][:, patch_idx].float(), dim=-1)  # [M, G, D]
    s = F.normalize(feats.text_tokens[k].float(), dim=-1)  # [N, L, D]
    sim = torch.einsum("mgd,nld->mngl", r, s)  # [M, N, G, L]
    held = tp[:, :, patch_idx]  # [M, N, G, L] token-level mass of the patches
    match = (held * sim).sum(-1) / held.sum(-1).clamp_min(1e-30)  # [M, N, G]
    ce.patch_match = _np(match.reshape(M, N, *grid))
    ce.entropy["token"] = _np(plan_entropy_ratio(tp))
    ce.tokens, ce.word_mass, ce.word_cosine = [], [], []
    sim_mass = res["token_sim_mass"][0, j]  # [M, N, L]
    for n in range(N):
        real = mask[n].cpu()
        labels = decode_tokens(
            tokenizer, feats.text_ids[k, n][real].tolist(), feats.context_slots[k, n][real].tolist()
        )
        ce.tokens.append(labels)
        col_mass = tp[:, n].sum(-2)[:, real.to(tp.device)]  # [M, L_n]
        mass = labels.word_mass(_np(col_mass))  # [M, W_n]
        cos = labels.word_mass(_np(sim_mass[:, n][:, real.to(tp.device)]))
        ce.word_mass.append(mass)
        ce.word_cosine.append(cos / np.maximum(mass, 1e-30))


# --------------------------------------------------------------------------- modes
def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance ``1 - cos`` over the ``S (S - 1) / 2`` pairs of ``S`` vectors.

    Args:
        x: ``[..., S, D]`` features (one per prompt set; need not be normalised).

    Returns:
        ``[...]``; 0 for ``S = 1``.
    """
    S = x.shape[-2]
    if S < 2:
        return torch.zeros(x.shape[:-2], dtype=torch.float32, device=x.device)
    z = F.normalize(x.float(), dim=-1)
    cos = z @ z.transpose(-1, -2)  # [..., S, S]
    off = cos.sum((-2, -1)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)  # sum over s != s'
    return 1.0 - off / (S * (S - 1))


def set_maps(c: ClassExplanation) -> tuple[np.ndarray, str]:
    """One patch map per visual prompt set for an explained (image, class): the prompt-level
    plan-weighted mean over the text sets n of the pair's per-patch score.

    Returns:
        (``[M, gh, gw]`` maps, what they show: "token match" - the token-level match
        ``patch_match`` of the hierarchical OT - or "patch cosine" - the cosine of each patch
        token with the class feature, for methods without a token level).
    """
    if c.patch_match is not None:
        score, kind = c.patch_match, "token match"
    else:
        score, kind = c.patch_cosine, "patch cosine"
    M, N = score.shape[:2]
    if c.prompt_plan is not None:
        w = c.prompt_plan / np.maximum(c.prompt_plan.sum(1, keepdims=True), 1e-30)  # rows sum to 1
    else:
        w = np.full((M, N), 1.0 / N)
    return np.einsum("mn,mnhw->mhw", w, score), kind


@dataclass
class SetSeparation:
    """How different a run's prompt sets make the features, over a dataset split.

    Attributes:
        image_distance: mean over the test images of the mean pairwise cosine distance between
            an image's M global features (one per visual prompt set).
        text_distance: mean over the classes of the mean pairwise cosine distance between a
            class's N global features (one per text prompt set).
        n_images, n_classes: what the means are over.
        sets: (M, N).
    """

    image_distance: float
    text_distance: float
    n_images: int
    n_classes: int
    sets: tuple[int, int]


def set_separation(
    run_dir: str | os.PathLike,
    *,
    subsample: str | None = None,
    batch_size: int = 128,
    device: str = "auto",
    backbone=None,
) -> SetSeparation:
    """:class:`SetSeparation` of a saved run on the test split of its dataset's ``subsample``
    classes (default: the run's). Methods with one prompt per modality give 0.0."""
    from .data import make_loader
    from .engine import load_run
    from .engine.build import image_sets, load_data

    method, cfg, _ = load_run(run_dir, device=device, backbone=backbone)
    data = load_data(cfg, cfg.run.seed, subsample)
    method.set_classnames(data.classnames)
    _, test = image_sets(cfg, data, method)
    dev = method.backbone.device
    loader = make_loader(test, batch_size, train=False, workers=0, device=dev)
    image_sum, n_images, text, sets = 0.0, 0, None, (1, 1)
    with torch.no_grad():
        for batch in loader:
            if batch["image"] is None:
                continue
            out = method(batch["image"].to(dev))
            if out.explain is not None:
                img, txt = out.explain.image_global, out.explain.text_global  # [B, M, D], [K, N, D]
            else:  # one prompt per modality
                img, txt = out.image_features.unsqueeze(1), out.text_features.unsqueeze(-2)
            image_sum += float(mean_pairwise_distance(img).sum())
            n_images += img.shape[0]
            if text is None:  # the class features do not depend on the images
                text = mean_pairwise_distance(txt.reshape(-1, *txt.shape[-2:]))
                sets = (img.shape[1], txt.shape[-2])
    if not n_images:
        raise ExplainError(f"{run_dir}: its test split has no readable images")
    return SetSeparation(
        image_distance=image_sum / n_images,
        text_distance=float(text.mean()),
        n_images=n_images,
        n_classes=len(data.classnames),
        sets=sets,
    )


# --------------------------------------------------------------------------- images and runs
def load_images(
    paths: Sequence[str | os.PathLike], preprocess
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Read image files into a preprocessed batch and the pictures the model sees (uint8).

    Raises:
        ExplainError: a path that does not exist or is not an image.
    """
    from .data import build_transform
    from .data.images import ImageReadError, read_image

    tf = build_transform(preprocess, train=False)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    xs, shown = [], []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise ExplainError(f"image {str(p)!r} does not exist; give image files")
        try:
            x = tf(read_image(path))
        except ImageReadError as e:
            raise ExplainError(
                f"{str(p)!r} is not an image PIL can read ({e}); give JPEG/PNG/... files"
            ) from e
        xs.append(x)
        pic = (x * std + mean).clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)
        shown.append(pic.numpy())
    return torch.stack(xs), shown


def explain(
    run_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    classes: Sequence[str] = (),
    topk: int = 2,
    panels: Panels = "auto",
    modes: bool = False,
    device: str = "auto",
    backbone=None,
) -> Explanation:
    """Explain a saved run's scores for image files (see :func:`explain_images`).

    Args:
        run_dir: a run folder written by :func:`promptalign.engine.train`.
        images: image files.
        classes: class names to explain besides each image's top ``topk``.
        topk: top classes explained per image.
        panels: "ot" (transport plans, OT methods only), "cosine" (patch-cosine maps) or
            "auto" (ot when the method has plans).
        device: "auto", "cpu", "cuda", ...
        backbone: an already built backbone to reuse.

    Returns:
        An :class:`Explanation`: the method, its scorer options and one
        :class:`ImageExplanation` per image (``images``: plans, score decompositions, heat maps
        as arrays); ``promptalign.viz.draw_image`` draws one, ``to_json()`` gives the numbers.
    """
    from .engine import load_run

    if not images:
        raise ExplainError("no images given; pass image files (or use --embeddings)")
    _check_topk(topk, classes)
    method, _, info = load_run(run_dir, device=device, backbone=backbone)
    x, shown = load_images(images, method.backbone.preprocess)
    res = explain_images(
        method,
        x.to(method.backbone.device),
        paths=[str(p) for p in images],
        display=shown,
        classes=classes,
        topk=topk,
        panels=panels,
        modes=modes,
    )
    res.method = str(info.get("method", res.method))
    return res


# --------------------------------------------------------------------------- embeddings
@dataclass
class Embeddings:
    """2-D projections of image embeddings, one per visual prompt set.

    Attributes:
        coords: ``[S, n, 2]`` coordinates (S visual prompt sets, n images), one joint projection.
        labels: ``[n]`` class index per image; classnames: names for them; paths: image files.
        projection: "tsne" or "pca".
    """

    coords: np.ndarray
    labels: np.ndarray
    classnames: list[str]
    paths: list[str]
    projection: str

    def describe(self) -> str:
        """E.g. "TSNE of 400 images x 4 visual prompt set(s)"."""
        n_sets, n_images = self.coords.shape[:2]
        return f"{self.projection.upper()} of {n_images} images x {n_sets} visual prompt set(s)"

    def csv_text(self) -> str:
        """:meth:`csv_rows` as CSV text."""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(self.csv_rows())
        return buf.getvalue()

    def csv_rows(self) -> list[list[Any]]:
        rows = [["image", "label", "class", "set", "x", "y"]]
        for s in range(self.coords.shape[0]):
            for i in range(self.coords.shape[1]):
                lab = int(self.labels[i])
                rows.append(
                    [
                        self.paths[i],
                        lab,
                        self.classnames[lab],
                        s,
                        f"{self.coords[s, i, 0]:.6g}",
                        f"{self.coords[s, i, 1]:.6g}",
                    ]
                )
        return rows


def image_embeddings(method, images: torch.Tensor) -> torch.Tensor:
    """``[B, S, D]`` L2-normalised global image features per visual prompt set (S = 1 for
    methods without the hook)."""
    with torch.no_grad():
        out = method(images)
    g = out.explain.image_global if has_ot(method) else out.image_features.unsqueeze(1)
    return F.normalize(g.float(), dim=-1)


def project_2d(
    x: np.ndarray, method: Literal["auto", "tsne", "pca"] = "auto", seed: int = 0
) -> tuple[np.ndarray, str]:
    """``[n, D] -> [n, 2]`` by t-SNE (scikit-learn) or PCA (numpy SVD); "auto": t-SNE when
    scikit-learn is installed."""
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            if method == "tsne":
                raise ExplainError(
                    "t-SNE needs scikit-learn: pip install 'promptalign[explain]' "
                    "(or use --projection pca)"
                ) from None
        else:
            perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
            tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
            return tsne.fit_transform(x.astype(np.float64)), "tsne"
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return centred @ vt[:2].T, "pca"


def embed_dataset(
    run_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    root: str | None = None,
    subsample: str | None = None,
    split: Literal["test", "train"] = "test",
    max_images: int = 400,
    projection: Literal["auto", "tsne", "pca"] = "auto",
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    backbone=None,
) -> Embeddings:
    """Image embeddings of a dataset split per visual prompt set, projected jointly to 2-D.

    ``dataset`` / ``root`` default to the run's, ``subsample`` to the run's on its own dataset
    and to "all" on another; at most ``max_images`` images (an even spread over the split, in
    its order).
    """
    from .data import (
        DatasetError,
        ImageDataset,
        build_transform,
        list_datasets,
        load_custom_dataset,
        load_dataset,
    )
    from .engine import load_run

    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ExplainError(f"max_images {max_images!r} must be an integer >= 1")
    method, cfg, _ = load_run(run_dir, device=device, backbone=backbone)
    name = dataset or cfg.data.dataset
    data_root = root or cfg.data.root
    # the run's own classes on its dataset; all classes of another one unless asked otherwise
    sub = subsample or (cfg.data.subsample if name == cfg.data.dataset else "all")
    if not name:
        raise ExplainError("no dataset: pass --dataset (a registered name or a folder / CSV path)")
    if name in list_datasets():
        data = load_dataset(name, data_root, seed=cfg.run.seed, subsample=sub)
    elif Path(name).expanduser().exists():
        data = load_custom_dataset(name, seed=cfg.run.seed, subsample=sub)
    else:
        raise DatasetError(
            f"dataset {name!r} is neither a registered dataset nor an existing folder / CSV path"
        )
    records = data.test if split == "test" else data.train
    if not records:
        raise ExplainError(f"dataset {name!r} has no {split} images")
    if len(records) > max_images:
        pick = np.linspace(0, len(records) - 1, max_images).round().astype(int)
        records = [records[i] for i in pick]
    ds = ImageDataset(
        data.name,
        data.image_root,
        records,
        build_transform(method.backbone.preprocess, train=False),
    )
    feats, labels = [], []
    dev = method.backbone.device
    method.eval()
    for i in range(0, len(ds), batch_size):
        items = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
        items = [it for it in items if it is not None and it["image"] is not None]
        if not items:
            continue
        x = torch.stack([it["image"] for it in items]).to(dev)
        feats.append(image_embeddings(method, x).cpu())
        labels += [int(it["label"]) for it in items]
    emb = torch.cat(feats).numpy()  # [n, S, D]
    n, S, D = emb.shape
    flat, used = project_2d(emb.transpose(1, 0, 2).reshape(S * n, D), projection, seed)
    return Embeddings(
        flat.reshape(S, n, 2),
        np.asarray(labels),
        list(data.classnames),
        [str(data.image_root / r.path) for r in records],
        used,
    )
