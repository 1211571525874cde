"""Bit identity on CPU: short demo-style trainings reproduce recorded numbers exactly.

The demo's setting (tiny-shapes-v3 on the synthetic colour x shape world, base classes) trained
briefly for the methods whose code paths refactors touch: the prompts after training, every
step's loss, the final accuracy, the logits of a fixed batch, and for the OT methods the plans
``promptalign.explain`` recomputes (prompt level, and token level for ALIGN). The reference values
in ``bit_identity.safetensors`` were recorded from the code before the OT solver objects and the
method contract were introduced; any change to them is a change of behaviour. Record them again
(only for an intended change of numbers) with ``PYTHONPATH=src python3 tests/test_bit_identity.py
--record``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).with_name("bit_identity.safetensors")

# (method, preset, options): the demo's methods and the ones whose forward / objective /
# schedule code the OT and contract refactors touch
CASES = {
    "coop": ("coop", None, {}),
    "align": ("align", None, {}),
    "align_reference": ("align", "reference", {"n_sets": 2}),
    "plot": ("plot", None, {"n_text_sets": 2, "n_visual_sets": 2}),
    "proda": ("proda", None, {"n_prompts": 4, "n_ctx": 4, "prompts_per_step": 2}),
    "clip_lora": ("clip_lora", None, {}),
}
SHOTS, EPOCHS, BATCH = 2, 2, 16


def _config(name, preset, options, root, *, epochs=EPOCHS, shots=SHOTS):
    from promptalign.config import (
        BackboneConfig,
        DataConfig,
        MethodSpec,
        OptimConfig,
        RunConfig,
        RunSettings,
    )

    return RunConfig(
        backbone=BackboneConfig("tiny-shapes-v3", None),
        method=MethodSpec(name, preset, options),
        data=DataConfig(
            dataset="synthetic_colour_shapes",
            root=str(root),
            shots=shots,
            subsample="base",
            workers=0,
        ),
        optim=OptimConfig(epochs=epochs, batch_size=BATCH, eval_batch_size=256),
        run=RunSettings(seed=1, device="cpu", progress=False),
    )


def compute(case: str, root: Path, out: Path, backbone) -> dict[str, torch.Tensor]:
    """Train ``case`` briefly and collect the tensors compared bit for bit."""
    from promptalign.data import ImageDataset, build_transform, load_dataset
    from promptalign.engine import load_run, train
    from promptalign.explain import explain_images

    name, preset, options = CASES[case]
    torch.manual_seed(0)
    losses: list[float] = []
    res = train(
        _config(name, preset, options, root),
        out / case,
        backbone=backbone,
        callbacks=[lambda rec: losses.append(rec["loss"])],
    )
    method, _, _ = load_run(out / case, device="cpu", backbone=backbone)
    found = {}
    for k, v in method.prompt_state_dict().items():  # a digest keeps the fixture small
        found[f"{case}/prompt_sha256/{k}"] = _sha256(v)
        found[f"{case}/prompt_sum/{k}"] = v.double().sum().reshape(1)
    found[f"{case}/loss"] = torch.tensor(losses, dtype=torch.float64)
    found[f"{case}/accuracy"] = torch.tensor([res.metrics["accuracy"]], dtype=torch.float64)
    data = load_dataset("synthetic_colour_shapes", root, seed=1, subsample="base")
    test = ImageDataset(
        data.name, data.image_root, data.test[:6], build_transform(backbone.preprocess, False)
    )
    images = torch.stack([test[i]["image"] for i in range(len(test))])  # [6, 3, 48, 48]
    with torch.no_grad():
        found[f"{case}/logits"] = method.logits(images).contiguous()
    if callable(getattr(method, "explain_features", None)):
        ex = explain_images(method, images[:1], topk=1, panels="ot")
        c = ex.images[0].classes[0]
        found[f"{case}/prompt_plan"] = torch.from_numpy(c.prompt_plan).contiguous()
        if c.token_plans is not None:
            found[f"{case}/token_plans"] = torch.from_numpy(c.token_plans).contiguous()
        found[f"{case}/explained_logit"] = torch.tensor([c.logit], dtype=torch.float64)
    return found


def _sha256(t: torch.Tensor) -> torch.Tensor:
    """The SHA-256 of a tensor's dtype, shape and bytes, as 32 uint8."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def budget_epochs(root: Path, backbone) -> dict[str, torch.Tensor]:
    """Epochs the engine derives from CLIP-LoRA's published iteration budget (also wrapped by
    NPT), for two shot counts: the schedule of a run that leaves ``optim.epochs`` unset."""
    from promptalign.engine import build_run

    found = {}
    for label, name, options in [
        ("clip_lora", "clip_lora", {}),
        ("npt_clip_lora", "npt", {"base": "clip_lora"}),
    ]:
        epochs = []
        for shots in (1, 4):
            cfg = _config(name, None, options, root, epochs=None, shots=shots)
            epochs.append(build_run(cfg, torch.device("cpu"), backbone).cfg.optim.epochs)
        found[f"budget/{label}"] = torch.tensor(epochs)
    return found


def _describe(key: str, got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{key}: {tuple(got.shape)} {got.dtype} vs recorded {tuple(want.shape)} {want.dtype}"
    if got.dtype == torch.uint8:
        return f"{key}: digest differs"
    diff = (got.double() - want.double()).abs().max().item()
    return f"{key}: max |diff| {diff:.3g}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import promptalign

    return tmp_path_factory.mktemp("world"), promptalign.load_backbone("tiny-shapes-v3")


@pytest.mark.parametrize("case", list(CASES))
def test_training_reproduces_the_recorded_numbers(case, world, tmp_path):
    from safetensors.torch import load_file

    root, backbone = world
    want = {k: v for k, v in load_file(FIXTURE).items() if k.startswith(f"{case}/")}
    assert want, f"no recorded values for {case!r} in {FIXTURE.name}"
    got = compute(case, root, tmp_path, backbone)
    assert sorted(got) == sorted(want)
    bad = [_describe(k, got[k], want[k]) for k in want if not torch.equal(got[k], want[k])]
    assert not bad, "changed: " + "; ".join(bad)


def test_iteration_budget_gives_the_recorded_epochs(world):
    from safetensors.torch import load_file

    root, backbone = world
    want = {k: v for k, v in load_file(FIXTURE).items() if k.startswith("budget/")}
    got = budget_epochs(root, backbone)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, got[k].tolist(), want[k].tolist())


def _record() -> None:  # pragma: no cover - run by hand, see the module docstring
    import tempfile

    from safetensors.torch import save_file

    import promptalign

    backbone = promptalign.load_backbone("tiny-shapes-v3")
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "world", Path(tmp) / "runs"
        found = {}
        for case in CASES:
            found.update(compute(case, root, out, backbone))
        found.update(budget_epochs(root, backbone))
    save_file(found, str(FIXTURE))
    print(f"wrote {len(found)} tensors to {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: PYTHONPATH=src python3 tests/test_bit_identity.py --record")
    _record()
