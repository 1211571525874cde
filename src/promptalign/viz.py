"""Drawing for ``promptalign explain`` (matplotlib, Agg backend): one PNG per image, the embedding
scatter. Takes the arrays :mod:`promptalign.explain` computes; computes nothing itself."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from .explain import ClassExplanation, Embeddings, ImageExplanation


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    _plt().close(fig)
    tmp.replace(path)
    return path


def _show_image(ax, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, cmap: str):
    """``heat`` over ``image``: colour and opacity grow with the value, so the picture stays
    visible where the map is low."""
    plt = _plt()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = image.shape[:2]
    ax.imshow(image, interpolation="bilinear", extent=(0, w, h, 0))
    norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12)
    # a spotlight: high values leave the picture as it is, low values darken it (colour-neutral,
    # so coloured objects stay recognisable)
    shade = np.zeros(heat.shape + (4,))
    shade[..., 3] = 0.85 * (1.0 - np.clip(norm(heat), 0, 1))
    ax.imshow(shade, interpolation="nearest", extent=(0, w, h, 0))
    im = ScalarMappable(norm=norm, cmap=plt.get_cmap("gray"))
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _plan_panel(ax, plan: np.ndarray, title: str) -> None:
    M, N = plan.shape
    vmax = max(float(plan.max()), 2.0 / plan.size)  # a uniform plan shows mid-blue
    ax.imshow(plan, cmap="Blues", vmin=0, vmax=vmax)
    size = 7 if max(M, N) <= 4 else 5
    for m in range(M):
        for n in range(N):
            v = plan[m, n]
            ax.text(
                n,
                m,
                f"{v:.3f}".lstrip("0"),
                ha="center",
                va="center",
                fontsize=size,
                color="white" if v > 0.6 * vmax else "black",
            )
    ax.set_xticks(range(N), [f"t{n}" for n in range(N)], fontsize=7)
    ax.set_yticks(range(M), [f"v{m}" for m in range(M)], fontsize=7)
    ax.set_xlabel("text prompt set", fontsize=7)
    ax.set_ylabel("visual prompt set", fontsize=7)
    ax.set_title(title, fontsize=8)


def _decomposition_panel(ax, c: ClassExplanation) -> None:
    plan = c.prompt_plan
    order = np.argsort(-plan.ravel(), kind="stable")
    pairs = [np.unravel_index(o, plan.shape) for o in order]
    g = np.array([c.logit_global[m, n] for m, n in pairs])
    t = np.array([c.logit_token[m, n] for m, n in pairs])
    labels = [f"v{m}-t{n} T={plan[m, n]:.3f}" for m, n in pairs]
    shown = ""
    if len(pairs) > 8:  # the 8 heaviest pairs (the title has the totals over all)
        g, t, labels = g[:8], t[:8], labels[:8]
        shown = f"\n(8 of {len(pairs)} pairs, by T)"
    y = np.arange(len(labels))
    ax.barh(y, g, color="tab:blue", label="global cosine")
    has_token = bool(np.any(c.logit_token != 0))
    if has_token:
        ax.barh(y, t, color="tab:orange", label="token OT")
    ax.set_yticks(y, labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.5)
    ax.tick_params(axis="x", labelsize=6)
    extra = f" + other {c.logit_extra:.2f}" if c.logit_extra else ""
    token = f" + token {c.logit_token.sum():.2f}" if has_token else ""
    ax.set_title(
        f"logit {c.logit:.2f} = global {c.logit_global.sum():.2f}{token}{extra}{shown}", fontsize=7
    )
    ax.legend(fontsize=6, loc="lower right")


def _word_panel(ax, c: ClassExplanation, m: int, n: int) -> None:
    words = c.tokens[n].words
    mass = c.word_mass[n][m]
    cos = c.word_cosine[n][m]
    y = np.arange(len(words))
    ax.barh(y, cos, color=["tab:gray" if w.startswith(("<", "[")) else "tab:green" for w in words])
    ax.set_yticks(y, [f"{w} ({x:.3f})" for w, x in zip(words, mass)], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.5)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_title(f"word (mass): cosine with its patches\npair v{m}-t{n}", fontsize=8)


def draw_image(
    ex: ImageExplanation, path: str | os.PathLike, *, method: str = "", dpi: int = 110
) -> Path:
    """One PNG for one image: per explained class a header row (image, prompt plan, score
    decomposition, word mass) and a row of maps over the image (token-level mass per text token
    for the dominant prompt pair, or patch cosines per visual prompt set)."""
    plt = _plt()
    if all(c.prompt_plan is None for c in ex.classes):
        return _draw_cosine_grid(ex, path, method=method, dpi=dpi)
    rows = []  # (class explanation, header panels, maps)
    for c in ex.classes:
        if c.heat is not None:
            m, n = c.dominant_pairs(1)[0]
            real = [i for i, _ in enumerate(c.tokens[n].tokens)]
            # in units of the uniform plan's mass per (patch, token), 1 / (J L_n)
            uniform = 1.0 / (c.token_plans.shape[2] * len(real))
            maps = [
                (c.heat[m, n, i] / uniform, c.tokens[n].tokens[i], c.heat[m, n, i].sum())
                for i in real
            ]
            maps_kind = ("token", m, n)
        else:
            M, N = c.patch_cosine.shape[:2]
            maps = []
            for m in range(M):
                n = int(np.argmax(c.prompt_plan[m])) if c.prompt_plan is not None else 0
                label = f"v{m}-t{n}" if (M > 1 or N > 1) else "patch cosine"
                maps.append((c.patch_cosine[m, n], label, None))
            maps_kind = ("cosine", None, None)
        rows.append((c, maps, maps_kind))
    ncols = max(4, max(len(r[1]) for r in rows))
    panel = 1.35
    fig = plt.figure(
        figsize=(max(ncols * panel, 10.0), len(rows) * 2 * panel * 1.15 + 0.5), layout="constrained"
    )
    subs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, (c, maps, (kind, pm, pn)) in zip(subs, rows):
        top, bottom = sub.subfigures(2, 1, height_ratios=[1.25, 1])
        head = top.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1.1, 1.6, 1.3]})
        _show_image(head[0], ex.image)
        head[0].set_title(f"{c.name}\np={c.prob:.2f}  logit {c.logit:.2f}", fontsize=8)
        if c.prompt_plan is not None:
            ent = c.entropy.get("prompt")
            _plan_panel(head[1], c.prompt_plan, f"prompt plan T\nentropy {ent:.3f} of uniform")
            _decomposition_panel(head[2], c)
        else:
            _plan_panel(head[1], c.global_sim, "global cosine")
            head[2].axis("off")
            head[2].text(
                0,
                0.5,
                f"logit = scale x cos\n= {c.logit:.2f}",
                fontsize=8,
                transform=head[2].transAxes,
            )
        if kind == "token":
            _word_panel(head[3], c, pm, pn)
        else:
            head[3].axis("off")
        axes = bottom.subplots(1, ncols, squeeze=False)[0]
        vals = np.stack([mp for mp, _, _ in maps])
        vmin, vmax = (0.0, 2.0) if kind == "token" else (float(vals.min()), float(vals.max()))
        cmap = "inferno" if kind == "token" else "viridis"
        im = None
        for ax, (mp, label, total) in zip(axes, maps):
            im = _overlay(ax, ex.image, mp, vmin, vmax, cmap)
            if kind == "token":
                ax.set_title(f"{label}\n{total:.3f} on patches", fontsize=7)
            else:
                ax.set_title(label, fontsize=7)
        for ax in axes[len(maps) :]:
            ax.axis("off")
        what = (
            (
                f"token-level plan of pair v{pm}-t{pn}: mass per patch for each text token, "
                f"bright = 2x the uniform plan's or more; "
                f"entropy {c.entropy['token'][pm, pn]:.3f} of uniform"
            )
            if kind == "token"
            else "cosine of each patch token with the class feature"
        )
        bottom.suptitle(what, fontsize=8)
        if im is not None:
            cb = bottom.colorbar(im, ax=list(axes[: len(maps)]), shrink=0.8, pad=0.01)
            cb.ax.tick_params(labelsize=6)
            if kind == "token":
                cb.set_label("x uniform", fontsize=6)
    fig.suptitle(
        f"{method}: {Path(ex.path).name}   top: " + ", ".join(f"{n} ({p:.2f})" for n, p in ex.top),
        fontsize=9,
    )
    return _save(fig, path, dpi)


def _draw_cosine_grid(ex: ImageExplanation, path, *, method: str, dpi: int) -> Path:
    """Methods without plans: one row per class, the image then its patch-cosine map(s)."""
    plt = _plt()
    n_maps = max(c.patch_cosine.shape[0] for c in ex.classes)
    ncols = 1 + n_maps
    fig, axes = plt.subplots(
        len(ex.classes),
        ncols,
        squeeze=False,
        layout="constrained",
        figsize=(1.9 * ncols + 1.2, 1.9 * len(ex.classes) + 0.6),
    )
    for row, c in zip(axes, ex.classes):
        _show_image(row[0], ex.image)
        row[0].set_title(f"{c.name}\np={c.prob:.2f}  logit {c.logit:.2f}", fontsize=8)
        maps = c.patch_cosine[:, 0]  # [M, gh, gw]
        im = None
        for m, ax in enumerate(row[1:]):
            if m >= maps.shape[0]:
                ax.axis("off")
                continue
            im = _overlay(ax, ex.image, maps[m], float(maps.min()), float(maps.max()), "viridis")
            ax.set_title(f"patch cosine (global {c.global_sim[m, 0]:.3f})", fontsize=7)
        if im is not None:
            fig.colorbar(im, ax=list(row[1:]), shrink=0.8, pad=0.02)
    fig.suptitle(
        f"{method}: {Path(ex.path).name}   top: "
        + ", ".join(f"{n} ({p:.2f})" for n, p in ex.top)
        + "\ncosine of each patch token with the class feature",
        fontsize=8,
    )
    return _save(fig, path, dpi)


def draw_embeddings(
    emb: Embeddings, path: str | os.PathLike, *, method: str = "", dpi: int = 110
) -> Path:
    """Scatter of the 2-D image embeddings, one panel per visual prompt set, coloured by class."""
    plt = _plt()
    S = emb.coords.shape[0]
    fig, axes = plt.subplots(
        1, S, figsize=(3.4 * S + 1.5, 3.6), squeeze=False, layout="constrained"
    )
    n_cls = len(emb.classnames)
    cmap = plt.get_cmap("tab20" if n_cls <= 20 else "hsv", max(n_cls, 1))
    for s, ax in enumerate(axes[0]):
        for k in np.unique(emb.labels):
            pts = emb.coords[s, emb.labels == k]
            ax.scatter(pts[:, 0], pts[:, 1], s=9, color=cmap(int(k)), label=emb.classnames[int(k)])
        ax.set_title(f"visual prompt set {s}" if S > 1 else "image embeddings", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if n_cls <= 24:
        axes[0, -1].legend(
            fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=1.5
        )
    fig.suptitle(
        f"{method}: {emb.projection.upper()} of image embeddings ({emb.coords.shape[1]} images)",
        fontsize=10,
    )
    return _save(fig, path, dpi)


def draw_modes(
    ex: ImageExplanation, path: str | os.PathLike, *, method: str = "", dpi: int = 110
) -> Path:
    """The modes view of one image (the ALIGN paper's qualitative figure): per explained class a
    row with the image, one patch map per visual prompt set side by side on one colour scale
    (:func:`promptalign.explain.set_maps`), the spread of the maps across the sets, and the
    prompt-level plan; the caption states the plan's entropy ratio and the sets' distances."""
    from .explain import set_maps

    plt = _plt()
    rows = [(c, *set_maps(c)) for c in ex.classes]
    M = max(maps.shape[0] for _, maps, _ in rows)
    spread = M > 1
    ncols = 2 + M + spread
    panel = 1.7
    fig = plt.figure(
        figsize=(ncols * panel + 1.2, len(rows) * (panel + 0.9) + 0.4), layout="constrained"
    )
    subs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, (c, maps, kind) in zip(subs, rows):
        axes = sub.subplots(1, ncols)
        _show_image(axes[0], ex.image)
        axes[0].set_title(f"{c.name}\nlogit {c.logit:.2f}", fontsize=8)
        vmin, vmax = float(maps.min()), float(maps.max())
        im = None
        for m in range(maps.shape[0]):
            im = _overlay(axes[1 + m], ex.image, maps[m], vmin, vmax, "gray")
            axes[1 + m].set_title(f"visual set v{m}\nmean {maps[m].mean():.3f}", fontsize=7)
        for ax in axes[1 + maps.shape[0] : 1 + M]:
            ax.axis("off")
        if spread:
            diff = maps.max(0) - maps.min(0)
            ax = axes[1 + M]
            shown = ax.imshow(diff, cmap="magma", vmin=0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"spread across sets\nmax {diff.max():.2g} of {vmax - vmin:.2g}", fontsize=7
            )
            cb = sub.colorbar(shown, ax=ax, shrink=0.7, pad=0.02)
            cb.ax.tick_params(labelsize=5)
        if im is not None:
            cb = sub.colorbar(im, ax=list(axes[1 : 1 + M]), shrink=0.7, pad=0.01)
            cb.ax.tick_params(labelsize=5)
            cb.set_label(kind, fontsize=6)
        if c.prompt_plan is not None:
            _plan_panel(axes[-1], c.prompt_plan, f"prompt plan T\n{c.entropy['prompt']:.5f}")
        else:
            axes[-1].axis("off")
        sub.supxlabel(textwrap.fill(ex.modes_caption(c), 150), fontsize=7)
    fig.suptitle(
        f"{method}: {Path(ex.path).name}  -  one map per visual prompt set "
        "(bright = high, same scale for every set)",
        fontsize=9,
    )
    return _save(fig, path, dpi)
