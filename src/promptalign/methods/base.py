"""The method base: config, the four roles, caching, state, and the registry entry points.

A method is one file holding a frozen config dataclass (defaults = the published settings, its
``optim`` the published optimisation settings) and a :class:`PromptMethod` subclass registered
with ``@METHODS.register(name)``; the registry imports the file on first use. Its roles, and the
hooks a method overrides:

* prompter: the learnable tokens, created in ``__init__`` (shared pieces in
  :mod:`.prompts`: ``build_class_prompts``, ``phrase_init``, ``check_depth``, ``CoupledPrompts``);
  ``on_classnames_changed()`` rebuilds class-dependent buffers (tokenised prompts);
* frozen encoder: the :class:`~promptalign.backbone.Backbone` it is given;
* class side: ``encode_classes() -> Any`` (cached during evaluation);
* image side + scorer: ``forward_with_text(images, classes) -> MethodOutput``, scoring with a
  head from :mod:`.heads` (cosine, OT over prompt sets, hierarchical OT);
* objective: ``loss_terms(out, batch) -> {name: weighted term}`` - cross-entropy plus the
  configured regularisers by default; a method adds a term by overriding it and calling super,
  or replaces it (ProDA's bound); what a term needs beyond the logits travels on the output
  (``MethodOutput.loss_inputs``).

The contract, which tests hold every method file to: a config validates its fields in
``check()`` (extending :meth:`MethodConfig.check`, errors name the field), never in its own
``__post_init__``; a method never overrides ``training_step``. The one trainer calls only
``trainable_parameters``, ``training_step`` (the sum of ``loss_terms``), ``logits``, the engine
hooks and the state functions; a run's optimiser settings come from the config
(:meth:`MethodConfig.published_optim`, a published iteration budget turned into epochs by
:func:`promptalign.resolve.resolve_config`).

What a method's released code sets (its defaults, per-dataset templates and hyper-parameters,
presets) is one table on its config, :attr:`MethodConfig.RELEASED` (:class:`Released`: one
:class:`ReleasedSetting` row per value, with the file and line of the release). Rows of one
dataset are applied when a run on that dataset is resolved (:meth:`MethodConfig.for_run`); a test
checks every row against the configs and the shipped run presets, so documentation rendered from
the table and the code cannot disagree.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone, TowerDepths
from ..config import (
    DEFAULT_OPTIM,
    ConfigError,
    FieldError,
    OptimConfig,
    check_choices,
    check_fields,
    to_dict,
)
from ..registry import METHODS, REGULARIZERS
from .explainable import ExplainFeatures
from .heads import cosine_logits, normalize_mean  # noqa: F401  (re-exported for method files)
from .prompts import check_depth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleasedSetting:
    """One value a method's released code sets, and where (plain data).

    Attributes:
        key: the config field ("template", "init_alpha"; "optim.lr" for optimisation settings).
        value: the released value, as the config holds it.
        source: where the release sets it: a file of the repository and its line(s).
        dataset: the registered dataset the row applies to ("" = every dataset); such rows are
            applied when a run on that dataset is resolved.
        preset: the config preset holding the value ("" = the config's own defaults).
    """

    key: str
    value: Any
    source: str
    dataset: str = ""
    preset: str = ""


@dataclass(frozen=True)
class Released:
    """A method's released defaults: its repository and one :class:`ReleasedSetting` per value.

    Attributes:
        code: the repository (URL) the sources of the rows are files of; "" when none was released.
        settings: the rows.
    """

    code: str = ""
    settings: tuple[ReleasedSetting, ...] = ()

    def datasets(self) -> list[str]:
        """The datasets the release sets something for, sorted."""
        return sorted({s.dataset for s in self.settings if s.dataset})

    def expected(self, dataset: str | None = None, preset: str | None = None) -> dict[str, Any]:
        """``{key: value}`` the release gives a run on ``dataset`` with config ``preset``: the
        default rows, then the dataset's, then the preset's (the order of
        :meth:`MethodConfig.for_run`)."""
        layers = [("", "")] + [(dataset, "")] * bool(dataset) + [("", preset)] * bool(preset)
        out: dict[str, Any] = {}
        for d, p in layers:
            out.update({s.key: s.value for s in self.settings if (s.dataset, s.preset) == (d, p)})
        return out

    def changes(self, dataset: str) -> dict[str, Any]:
        """The config changes of ``dataset``'s rows, as :meth:`MethodConfig.replace` takes them
        (``optim.*`` keys nested under ``optim``)."""
        out: dict[str, Any] = {}
        for s in self.settings:
            if s.dataset == dataset and not s.preset:
                head, _, rest = s.key.partition(".")
                if rest:
                    out.setdefault(head, {})[rest] = s.value
                else:
                    out[s.key] = s.value
        return out


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method has. Subclasses add their own, with published defaults; values are
    checked here (Literal fields, registered regulariser names) and converted by field type in
    :meth:`replace`, so a YAML file, a preset and ``KEY=VALUE`` all give the same typed config.

    Subclasses check their own fields by extending :meth:`check` (never ``__post_init__``).

    Attributes:
        regularizers: names of registered regularisers added to the objective (e.g. NPT's).
        regularizer_options: per-regulariser keyword options, ``{name: {key: value}}``.
        optim: the published optimisation settings (None fields: the library defaults,
            :data:`promptalign.config.DEFAULT_OPTIM`).
    """

    regularizers: tuple[str, ...] = ()
    regularizer_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    optim: OptimConfig = OptimConfig()

    # named presets: {preset name: {field: value}} (e.g. ALIGN's released-code reference)
    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # what the method's released code sets, row by row with file and line (see Released)
    RELEASED: ClassVar[Released] = Released()
    # prompt-depth fields and the towers ("text", "vision") each must fit, in the order they are
    # fitted (e.g. MaPLe's coupled prompts: {"depth": ("text", "vision")}); see fit_towers
    TOWER_DEPTHS: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate the field values; raise :class:`~promptalign.config.FieldError` starting
        with the field's name (``"n_ctx: 0 must be >= 1"``). Subclasses extend it: call
        ``super().check()`` first, then check their own fields."""
        check_choices(self)
        unknown = [r for r in self.regularizers if r not in REGULARIZERS]
        if unknown:
            raise FieldError(
                f"regularizers: unknown regularizer(s) {unknown}; registered: "
                f"{REGULARIZERS.names()}"
            )

    def iteration_budget(self, shots: int | None) -> int | None:
        """Hook: the optimiser steps the published schedule runs for ``shots`` labelled images
        per class when it is given in steps rather than epochs (e.g. CLIP-LoRA's 500 x shots);
        None (the default): the schedule is ``optim``'s epochs. The engine turns a budget into
        epochs once the run's classes are known
        (:func:`promptalign.config.resolve_optim`)."""
        return None

    def published_optim(self) -> OptimConfig:
        """The published optimisation settings with every field set (the library defaults,
        :data:`~promptalign.config.DEFAULT_OPTIM`, under ``optim``): what a run starts from
        before its own ``optim`` settings. A method that wraps another extends it."""
        return DEFAULT_OPTIM.merged(self.optim)

    def fit_towers(self, towers: TowerDepths) -> MethodConfig:
        """This config with every prompt depth of :attr:`TOWER_DEPTHS` fitted to the towers: a
        depth beyond a tower (e.g. the published 9 on a 4-layer model) becomes the tower's layer
        count, with a logged note (:func:`~promptalign.methods.prompts.check_depth`), so every
        method's defaults run on every backbone and a run's config records the depth it uses.
        Depths below 1 are left to the method's own check."""
        changes = {}
        for name, which in self.TOWER_DEPTHS.items():
            depth = getattr(self, name)
            if depth < 1:
                continue
            for tower in which:
                label = "text prompt" if tower == "text" else "visual prompt"
                depth = check_depth(depth, getattr(towers, tower), label)
            if depth != getattr(self, name):
                changes[name] = depth
        return self.replace(**changes) if changes else self

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with ``changes``, converted by field type (``optim`` changes merge into the
        current settings); unknown keys and bad values raise :class:`ConfigError` naming them."""
        typed = check_fields(type(self), changes)
        if "optim" in typed:
            typed["optim"] = self.optim.merged(typed["optim"])
        return dataclasses.replace(self, **typed)

    @classmethod
    def from_preset(cls, preset: str | None = None, **changes: Any) -> MethodConfig:
        return cls()._layered(preset, changes)

    def _layered(self, preset: str | None, changes: Mapping[str, Any]) -> MethodConfig:
        """This config with ``preset`` then ``changes`` on top."""
        base = self
        if preset is not None:
            if preset not in self.PRESETS:
                raise ConfigError(
                    f"{type(self).__name__} has no preset {preset!r}; "
                    f"presets: {sorted(self.PRESETS) or 'none'}"
                )
            base = base.replace(**dict(self.PRESETS[preset]))
        return base.replace(**changes)

    @classmethod
    def for_run(
        cls,
        preset: str | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        dataset: str | None = None,
        template: str | None = None,
        towers: TowerDepths | Callable[[], TowerDepths] | None = None,
    ) -> MethodConfig:
        """The resolved config of a run on ``dataset`` (a registered name; None for a custom
        one): published defaults < the release's settings for that dataset (the dataset rows of
        :attr:`RELEASED`, e.g. a per-dataset template) < ``preset`` < ``options``, then
        :meth:`resolved`. A method with a ``template`` field gets ``template`` (the dataset's
        hand-written one) unless the release's rows or ``options`` set it.

        This is the method's part of :func:`promptalign.resolve.resolve_run`, which gives the
        ``towers`` of the run's backbone (or a function computing them when first needed)."""
        options = dict(options or {})
        released = cls.RELEASED.changes(dataset) if dataset else {}
        base = cls().replace(**released) if released else cls()
        config = base._layered(preset, options)
        own = "template" in options or "template" in released
        return config.resolved(None if own else template, dataset=dataset, towers=towers)

    def resolved(
        self,
        template: str | None = None,
        dataset: str | None = None,
        towers: TowerDepths | Callable[[], TowerDepths] | None = None,
    ) -> MethodConfig:
        """This config with everything that decides the method filled in, as a run folder
        records it: the dataset's hand-written ``template`` for a method with a ``template``
        field (pass None when the run sets its own), and prompt depths fitted to ``towers``
        (:meth:`fit_towers`; None: left as they are). A method that wraps another (NPT) also
        spells out the wrapped method's whole config here (for ``dataset``), so the record and
        a benchmark job's fingerprint change when the wrapped method's defaults do."""
        config = self
        if template is not None and "template" in {f.name for f in dataclasses.fields(self)}:
            config = config.replace(template=template)
        if towers is not None and self.TOWER_DEPTHS:
            config = config.fit_towers(towers() if callable(towers) else towers)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (what a run folder's config.yaml records)."""
        return to_dict(self)


@dataclass
class MethodOutput:
    """What a method's forward returns.

    Attributes:
        logits: ``[B, K]`` class scores (already multiplied by the logit scale).
        image_features: ``[B, D]`` L2-normalised image features (mean over prompt sets).
        text_features: ``[K, D]`` (or ``[B, K, D]`` for image-conditioned prompts) L2-normalised
            class features (mean over prompt sets).
        extras: method-specific diagnostics (e.g. OT convergence), scalar tensors, logged.
        loss_inputs: tensors the method's :meth:`PromptMethod.loss_terms` needs beyond the
            logits (e.g. ProDA's per-prompt class features), not logged.
        explain: for methods scoring with an OT head, the head and the inputs it scored
            (:class:`~promptalign.methods.explainable.ExplainFeatures`), for ``explain``.
    """

    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    explain: ExplainFeatures | None = None


class Batch(NamedTuple):
    """One training batch as the objective sees it: images ``[B, 3, H, W]``, labels ``[B]``."""

    images: torch.Tensor
    labels: torch.Tensor


class Regularizer(nn.Module, abc.ABC):
    """A loss term added to any method's objective; returns already weighted named terms."""

    @abc.abstractmethod
    def forward(
        self, out: MethodOutput, batch: Batch, method: PromptMethod
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms for one batch (``method``: the method being trained)."""


def _is_backbone_key(key: str) -> bool:
    """True for state keys inside a backbone (also one held by a wrapped inner method)."""
    return "backbone" in key.split(".")


class PromptMethod(nn.Module, abc.ABC):
    """Base class of every prompt-learning method.

    Subclasses implement :meth:`encode_classes` (everything on the class side that does not
    depend on the image; cached during evaluation) and :meth:`forward_with_text` (image side and
    scorer), and optionally :meth:`on_classnames_changed` (re-tokenise class prompts).
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    registered_name: ClassVar[str] = ""
    # False when the class side has no trainable input (fixed text): it is then cached in
    # training too, until the class names change
    class_side_trainable: ClassVar[bool] = True

    def __init__(
        self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig | None = None
    ):
        super().__init__()
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.backbone = backbone
        self.config = config
        self._classnames = self._check_classnames(classnames)
        self._cache: tuple[torch.device, Any] | None = None
        self.regularizer_modules = nn.ModuleList(
            REGULARIZERS.get(name)(**dict(config.regularizer_options.get(name, {})))
            for name in config.regularizers
        )

    # ------------------------------------------------------------------ classes
    @staticmethod
    def _check_classnames(classnames: Sequence[str]) -> tuple[str, ...]:
        names = tuple(str(c) for c in classnames)
        if not names:
            raise ValueError("classnames is empty; give at least one class name")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ValueError(f"duplicate class names: {dup}")
        return names

    @property
    def classnames(self) -> tuple[str, ...]:
        return self._classnames

    @property
    def num_classes(self) -> int:
        return len(self._classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Switch to other classes (e.g. base -> new evaluation); prompts are kept."""
        self._classnames = self._check_classnames(classnames)
        self.on_classnames_changed()
        self.clear_cache()

    def on_classnames_changed(self) -> None:
        """Hook: rebuild class-dependent buffers (tokenised prompts)."""

    # ------------------------------------------------------------------ roles
    @abc.abstractmethod
    def encode_classes(self) -> Any:
        """Class-side features for all classes (text tower with the current prompts)."""

    @abc.abstractmethod
    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        """Image side + scorer, given :meth:`encode_classes`' output."""

    # ------------------------------------------------------------------ caching
    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True) -> PromptMethod:
        if self.class_side_trainable:
            self.clear_cache()
        return super().train(mode)

    def class_features(self) -> Any:
        """:meth:`encode_classes`, computed once per evaluation (cached while in eval mode)."""
        if self.training and self.class_side_trainable:
            return self.encode_classes()
        device = self.backbone.device
        if self._cache is None or self._cache[0] != device:
            with torch.no_grad():
                self._cache = (device, self.encode_classes())
        return self._cache[1]

    # ------------------------------------------------------------------ API used by the trainer
    def forward(self, images: torch.Tensor) -> MethodOutput:
        return self.forward_with_text(images, self.class_features())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` logits for the current classes."""
        return self(images).logits

    def loss_terms(self, out: MethodOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The objective's named, already weighted terms; the loss is their sum.

        The seam for a method's own loss: override, call ``super().loss_terms(out, batch)`` and
        add entries (e.g. KgCoOp's knowledge-guided term). Default: cross-entropy plus the
        configured regularisers (each sees the output, the batch and the method).
        """
        terms: dict[str, torch.Tensor] = {"ce": F.cross_entropy(out.logits, batch.labels)}
        terms.update(self.regularizer_terms(out, batch))
        return terms

    def regularizer_terms(self, out: MethodOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The configured regularisers' weighted terms (each sees the output, the batch and the
        method), for a :meth:`loss_terms` that replaces the cross-entropy."""
        terms: dict[str, torch.Tensor] = {}
        for reg in self.regularizer_modules:
            terms.update(reg(out, batch, self))
        return terms

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One step's objective. ``batch`` is (images, labels) or a dict with "image"/"label".
        Returns {"loss", <loss terms>, "ce", "acc", <extras>} ("ce", the cross-entropy of the
        logits, as a diagnostic when no loss term has that name). Methods do not override this:
        they override :meth:`loss_terms` (and the roles), so one trainer owns optimisation."""
        if isinstance(batch, Mapping):
            batch = Batch(batch["image"], batch["label"])
        else:
            batch = Batch(batch[0], batch[1])
        out = self(batch.images)
        terms = self.loss_terms(out, batch)
        loss = sum(terms.values())
        with torch.no_grad():
            if "ce" not in terms:
                terms = {**terms, "ce": F.cross_entropy(out.logits, batch.labels)}
            acc = (out.logits.argmax(-1) == batch.labels).float().mean()
        return {"loss": loss, **terms, "acc": acc, **out.extras}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (never any of the frozen CLIP)."""
        return [
            p for n, p in self.named_parameters() if p.requires_grad and not _is_backbone_key(n)
        ]

    # ------------------------------------------------------------------ engine hooks (no-ops)
    # Each is called from exactly one place in the engine (loop.py); methods that need data beyond
    # the training batches (a feature cache, a validation search) or epoch-level state override
    # them.
    def fit_before_training(
        self, train_batches: Callable[..., Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """Hook: build data-dependent state before the optimiser is created (e.g. Tip-Adapter's
        cache from the few-shot training features). Called on fresh runs and on resume (a resume
        then overwrites the state with the saved one), so it must be deterministic.
        ``train_batches(view=0, crop_scale=None)`` iterates ``(images, labels)`` over the
        training split in a fixed order with training augmentation: view ``view`` (each view's
        crops and flips drawn from its own seeds, the same whatever the worker count), cropping
        ``crop_scale`` of the image area (None: the run's training crop). Parameters created
        here are optimised."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Hook: called after the last step of every epoch (0-based ``epoch`` of ``epochs``),
        before the epoch checkpoint (e.g. PromptSRC's Gaussian prompt aggregation)."""

    def select_on_validation(
        self, val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> dict[str, float]:
        """Hook: choose inference-time hyper-parameters on the validation split (never test)
        after training, before the final evaluation (e.g. Tip-Adapter's alpha/beta search).
        ``val_batches()`` iterates ``(images, labels)`` without augmentation. Returns what was
        chosen (logged and stored in the run info)."""
        return {}

    @property
    def optim_preset(self) -> OptimConfig:
        """The published optimisation settings (every field set) the trainer starts from
        (:meth:`MethodConfig.published_optim`)."""
        return self.config.published_optim()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ------------------------------------------------------------------ state
    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own state (prompts, projections, meta-nets); never CLIP weights."""
        return {
            k: v.detach().clone() for k, v in self.state_dict().items() if not _is_backbone_key(k)
        }

    def load_prompt_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strictly load :meth:`prompt_state_dict` output; mismatches name the keys and shapes."""
        own = {k: v for k, v in self.state_dict().items() if not _is_backbone_key(k)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [
            f"{k}: given {tuple(state[k].shape)} vs method {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"state does not fit method {self.registered_name!r}: missing {missing}, "
                f"unexpected {unexpected}, shape mismatches {shapes}"
            )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])
        self.clear_cache()


def list_methods() -> list[str]:
    """Names of all registered methods (the registry imports every method file on first use)."""
    return METHODS.names()


def create_method(
    name: str,
    backbone: Backbone,
    classnames: Sequence[str],
    *,
    preset: str | None = None,
    config: MethodConfig | None = None,
    **overrides: Any,
) -> PromptMethod:
    """Build a registered method.

    Args:
        name: a name from :func:`list_methods`.
        backbone: the frozen CLIP.
        classnames: the classes to score.
        preset: a named preset of the method's config (e.g. "reference"); None = published defaults.
        config: a ready config instance (overrides are applied on top).
        **overrides: config fields to change.
    """
    cls = METHODS.get(name)
    if config is None:
        config = cls.config_class.from_preset(preset, **overrides)
    else:
        config = config.replace(**overrides)
    return cls(backbone, classnames, config)
