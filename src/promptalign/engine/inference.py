"""Using a finished run: rebuild it from its folder, evaluate it, predict labels for images."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data import build_transform
from ..data.base import DatasetError
from ..data.images import ImageReadError, read_image
from . import checkpoint as ck
from . import distributed as du
from .build import READING, build_method, changed_settings, image_sets, load_data
from .evaluate import evaluate

log = logging.getLogger(__name__)


def load_run(run_dir: str | os.PathLike, *, device: str = "auto", backbone=None):
    """Rebuild a trained method from its run folder alone.

    Args:
        run_dir: a run folder written by :func:`promptalign.engine.train`.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        backbone: an already built backbone to reuse (it must be the run's architecture).

    Returns:
        ``(method, config, info)``: the method in eval mode with the run's prompts loaded, the
        run's resolved ``RunConfig`` and its ``run.json`` record (class names, metrics).

    Raises:
        CheckpointError: a missing or damaged run file, or prompts holding NaN/inf.
    """
    run_dir = Path(run_dir).expanduser()
    cfg = ck.read_config(run_dir)
    info = ck.read_json(run_dir / ck.RUN_INFO)
    if "classnames" not in info or not isinstance(info["classnames"], list):
        raise ck.CheckpointError(f"{run_dir / ck.RUN_INFO} lacks the class names")
    method = build_method(cfg, info["classnames"], du.local_device(device), backbone)
    state = ck.read_tensors(run_dir / ck.PROMPTS)
    bad = sorted(
        k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if bad:
        raise ck.CheckpointError(
            f"{run_dir / ck.PROMPTS}: tensors {bad} hold NaN/inf (the training "
            "diverged); retrain with a lower optim.lr"
        )
    try:
        method.load_prompt_state_dict(state)
    except ValueError as e:
        raise ck.CheckpointError(f"{run_dir / ck.PROMPTS}: {e}") from e
    return method.eval(), cfg, info


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    subsample: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    device: str = "auto",
    backbone=None,
    batch_size: int | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Evaluate a saved run on its dataset's test split, other classes (``subsample``) or another
    dataset (cross-dataset / domain generalisation).

    Args:
        run_dir: a run folder written by :func:`promptalign.engine.train`.
        subsample: "all", "base" or "new" classes; None = the run's own subset on its own
            dataset, every class ("all") of another ``dataset``.
        dataset: another registered dataset or custom folder / CSV to evaluate on (the prompts
            are rebuilt for its class names).
        root: the data root for ``dataset`` (None: the run's).
        device: "auto", "cpu", "cuda", ...
        backbone: an already built backbone to reuse.
        batch_size: evaluation batch size (None: the run's ``optim.eval_batch_size``).
        overrides: how unreadable images are handled (:data:`~.build.READING`:
            ``data.skip_corrupt``, ``data.max_image_pixels``), e.g. ``["data.skip_corrupt=true"]``;
            any other key is a :class:`ConfigError`.

    Returns:
        The metrics: ``accuracy`` and ``macro_f1`` (percent), ``n`` images, ``skipped``
        unreadable images, ``dataset``, ``subsample`` (the subset used), ``num_classes``,
        ``sample_check`` and, for OT methods, ``diagnostics`` (mean plan entropy ratios).

    "new" classes of the run's own dataset are refused for a run trained on all classes: they
    would be trained classes. On the run's own dataset, the data as read now is checked against
    the run's recorded sample (``sample.json``): when it no longer gives that sample (the data,
    its split files or its few-shot cache changed), a warning says so. The result's
    ``"sample_check"`` is "same", "changed", "unrecorded" (an older run folder) or "not checked"
    (another dataset)."""
    method, cfg, info = load_run(run_dir, device=device, backbone=backbone)
    if overrides:
        cfg = changed_settings(
            cfg,
            overrides,
            READING,
            "evaluation uses the run as its config.yaml says",
            "train another run to change them",
        )
    if dataset is not None and dataset != cfg.data.dataset and subsample is None:
        subsample = "all"  # another dataset: all of its classes unless asked otherwise
    if subsample == "new" and dataset is None and cfg.data.subsample == "all":
        raise ConfigError(
            f"{run_dir} was trained on all classes of {cfg.data.dataset}, so its 'new' classes "
            "were trained on; base-to-new needs a run trained with --subsample base "
            "(evaluate this one with --subsample all, or on another --dataset)"
        )
    data_cfg = cfg.data
    own = dataset is None or (dataset == data_cfg.dataset and data_cfg.split_file is None)
    if dataset is not None:
        data_cfg = dataclasses.replace(
            data_cfg, dataset=dataset, root=root or data_cfg.root, split_file=None
        )
    elif root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=root)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    data = load_data(cfg, cfg.run.seed, subsample)
    check = _check_sample(Path(run_dir).expanduser(), cfg, data, own=own)
    method.set_classnames(data.classnames)
    _, test = image_sets(cfg, data, method)
    dev = method.backbone.device
    with du.process_group(dev):
        m = evaluate(
            method,
            test,
            batch_size=batch_size or cfg.optim.eval_batch_size,
            device=dev,
            amp=cfg.optim.amp,
            where=f"evaluation of {run_dir}",
        )
    m.update(
        dataset=data.name,
        subsample=data.subsample,
        num_classes=data.num_classes,
        sample_check=check,
    )
    return m


def _check_sample(run_dir: Path, cfg, data, *, own: bool) -> str:
    """Compare the run's recorded sample with its dataset as read now (the run's own subsample,
    read again when the evaluation uses another); warn when it changed."""
    if not own:
        return "not checked"
    if data.subsample != cfg.data.subsample:
        data = load_data(cfg, cfg.run.seed)
    status, message = ck.check_sample(run_dir, data)
    if status == "changed":
        log.warning("%s", message)
    elif status == "unrecorded":
        log.info("%s; the sample is not checked", message)
    return status


def predict(
    run_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    classnames: Sequence[str] | None = None,
    topk: int = 5,
    device: str = "auto",
    backbone=None,
    skip_unreadable: bool = False,
    max_image_pixels: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels for image files with a saved run (its classes, or ``classnames``).

    Args:
        run_dir: a run folder written by :func:`promptalign.engine.train`.
        images: image files, each read with Pillow and preprocessed as the backbone's weights
            expect.
        classnames: class names to choose from (distinct, non-empty; the prompts transfer to
            them); None = the run's.
        topk: labels per image (>= 1; at most the number of classes are returned).
        device: "auto", "cpu", "cuda", ...
        backbone: an already built backbone to reuse.
        skip_unreadable: an unreadable image (or one over the pixel limit) gives a row
            ``{"image", "error"}`` instead of raising.
        max_image_pixels: the pixel limit (None = the run's ``data.max_image_pixels``).

    Returns:
        One row per image, in order: ``{"image", "top": [{"label", "prob"}, ...]}``
        (probabilities from the softmax over the classes) or, with ``skip_unreadable``,
        ``{"image", "error"}``.

    Raises:
        DatasetError: bad ``classnames`` or ``topk``; an unreadable image (without
            ``skip_unreadable``).
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise DatasetError(f"predict: topk {topk!r} must be an integer >= 1")
    if classnames is not None:
        classnames = check_classnames(classnames, "predict: classnames")
    method, cfg, _ = load_run(run_dir, device=device, backbone=backbone)
    if classnames:
        method.set_classnames(classnames)
    limit = max_image_pixels if max_image_pixels is not None else cfg.data.max_image_pixels
    tf = build_transform(method.backbone.preprocess, train=False)
    out = []
    for path in images:
        try:
            x = tf(read_image(path, limit)).unsqueeze(0).to(method.backbone.device)
        except ImageReadError as e:
            if skip_unreadable:
                out.append({"image": str(path), "error": f"unreadable image: {e}"})
                continue
            raise DatasetError(f"cannot read image {path}: {e}") from e
        with torch.no_grad():
            probs = method.logits(x).softmax(-1)[0]
        k = min(topk, probs.numel())
        p, idx = probs.topk(k)
        out.append(
            {
                "image": str(path),
                "top": [
                    {"label": method.classnames[i], "prob": float(q)}
                    for q, i in zip(p.tolist(), idx.tolist())
                ],
            }
        )
    return out


def check_classnames(classnames: Sequence[str], what: str) -> list[str]:
    """``classnames`` as a list of distinct, non-empty strings.

    Raises:
        DatasetError: naming ``what`` and the empty or repeated names.
    """
    if isinstance(classnames, str) or not all(isinstance(c, str) for c in classnames):
        raise DatasetError(f"{what}: give a list of class names (strings)")
    names = list(classnames)
    if not names:
        raise DatasetError(f"{what}: no class names given")
    if any(not c.strip() for c in names):
        raise DatasetError(f"{what}: empty class name in {names[:10]}; give non-empty names")
    seen: set[str] = set()
    dup = sorted({c for c in names if c in seen or seen.add(c)})
    if dup:
        raise DatasetError(f"{what}: {dup[:10]} given more than once; give each class once")
    return names
