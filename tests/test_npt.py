"""NPT: the simplex ETF, the regulariser's terms on any method, more classes than the embedding
width, and the wrapping method's resolved record."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptalign.methods import MethodOutput, create_method
from promptalign.methods.base import Batch
from promptalign.methods.npt import NPTRegularizer, etf_gram

from conftest import CLASSES, images_for, labelled_batch


def test_etf_gram_is_a_simplex_etf():
    G = etf_gram(5)
    assert torch.allclose(G.diagonal(), torch.ones(5))
    assert torch.allclose(G.sum(1), torch.zeros(5), atol=1e-6)  # vectors sum to zero
    assert torch.linalg.matrix_rank(G) == 4


def test_npt_regularizer_on_any_method_and_its_terms(tiny):
    torch.manual_seed(0)
    m = create_method(
        "coop",
        tiny,
        CLASSES,
        n_ctx=4,
        regularizers=("npt",),
        regularizer_options={"npt": {"text_weight": 2.0, "image_weight": 0.5}},
    ).train()
    out = m.training_step(labelled_batch(tiny, 3))
    assert {"npt_text", "npt_image"} <= set(out)
    torch.testing.assert_close(out["loss"], out["ce"] + out["npt_text"] + out["npt_image"])
    # the terms vanish exactly at the ETF: text features forming an ETF, images on their class
    K, D = 4, 8
    basis = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(0)))[0]
    centered = torch.eye(K) - 1.0 / K
    etf = F.normalize((basis @ centered).t(), dim=-1)  # [K, D] simplex ETF
    labels = torch.tensor([0, 2])
    out = MethodOutput(torch.zeros(2, K), etf[labels], etf)
    terms = NPTRegularizer()(out, Batch(torch.zeros(2, 3, 8, 8), labels), m)
    assert terms["npt_text"] < 1e-10 and terms["npt_image"] < 1e-10


def test_npt_more_classes_than_width(tiny):
    many = [f"class {i}" for i in range(tiny.embed_dim + 8)]  # K - 1 > D
    torch.manual_seed(0)
    x = images_for(tiny, 2)
    y = torch.tensor([0, 1])
    m = create_method("coop", tiny, many, n_ctx=2, regularizers=("npt",)).train()
    out = m.training_step((x, y))
    assert torch.isfinite(out["npt_text"]) and torch.isfinite(out["npt_image"])
    strict = create_method(
        "coop",
        tiny,
        many,
        n_ctx=2,
        regularizers=("npt",),
        regularizer_options={"npt": {"too_many_classes": "error"}},
    ).train()
    with pytest.raises(ValueError, match="embedding width"):
        strict.training_step((x, y))


def test_npt_method_wraps_a_base_method(tiny):
    torch.manual_seed(0)
    m = create_method("npt", tiny, CLASSES, base_options={"depth": 2}).train()
    out = m.training_step(labelled_batch(tiny, 3))
    assert {"npt_text", "npt_image", "ce"} <= set(out)
    assert m.optim_preset == m.inner.optim_preset
    assert m.num_trainable() == m.inner.num_trainable()


def test_npt_resolved_config_spells_out_its_base_method(tiny, monkeypatch):
    import dataclasses

    from promptalign.benchmark import config_fingerprint
    from promptalign.config import MethodSpec, RunConfig
    from promptalign.methods.maple import MaPLeConfig
    from promptalign.registry import METHODS
    from promptalign.resolve import resolve_method

    spec = resolve_method(MethodSpec(name="npt", options={"base_options": {"depth": 2}}), "a {}")
    base = spec.options["base_options"]
    # every MaPLe field is in the record, with the run's change and MaPLe's published defaults
    assert base["depth"] == 2 and base["n_ctx"] == 2 and base["ctx_init"] == "a photo of a"
    assert base["optim"]["lr"] == 0.0035 and base["optim"]["batch_size"] == 4
    assert resolve_method(spec, "a {}") == spec  # resolving a resolved record changes nothing
    short = create_method("npt", tiny, CLASSES, base_options={"depth": 2})
    full = create_method("npt", tiny, CLASSES, **spec.options)
    assert full.inner.config == short.inner.config
    assert full.optim_preset == short.optim_preset
    # the dataset's template reaches a base that has a template field, unless the run sets one
    vpt = resolve_method(MethodSpec(name="npt", options={"base": "vpt"}), "a {}")
    assert vpt.options["base_options"]["template"] == "a {}"
    own = {"base": "vpt", "base_options": {"template": "my {}"}}
    mine = resolve_method(MethodSpec(name="npt", options=own), "a {}")
    assert mine.options["base_options"]["template"] == "my {}"
    # a benchmark job's fingerprint follows the wrapped method's defaults
    cfg = RunConfig(method=MethodSpec(name="npt"))
    before = config_fingerprint(cfg)

    @dataclasses.dataclass(frozen=True)
    class WiderMaPLe(MaPLeConfig):
        n_ctx: int = 3

    monkeypatch.setattr(METHODS.get("maple"), "config_class", WiderMaPLe)
    assert config_fingerprint(cfg) != before
