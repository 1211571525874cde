"""CLIP-LoRA: zero-shot CLIP at zero B, merged weights for export, the dropout path, and epochs
from its iteration budget."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from promptalign.methods import create_method
from promptalign.methods.base import cosine_logits

from conftest import CLASSES, images_for


def test_clip_lora_zero_b_is_zero_shot_exactly_and_leaves_the_backbone_untouched(backbone):
    before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    attn_before = [type(b.attn) for b in backbone.clip.visual.transformer.resblocks]
    lora = create_method("clip_lora", backbone, CLASSES).eval()
    x = images_for(backbone, 4, seed=2)
    with torch.no_grad():  # zero-shot CLIP with the released prompt, straight from the backbone
        text = F.normalize(
            backbone.encode_text(backbone.tokenize([f"a photo of a {c}." for c in CLASSES])), dim=-1
        )
        zs = cosine_logits(
            F.normalize(backbone.encode_image(x), dim=-1), text, backbone.logit_scale
        )
        assert torch.equal(lora.logits(x), zs)
    lora.train()
    out = lora.training_step((x, torch.tensor([0, 1, 2, 3])))
    out["loss"].backward()
    assert [type(b.attn) for b in backbone.clip.visual.transformer.resblocks] == attn_before
    after = backbone.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad or p.grad is not None for p in backbone.parameters())
    # the B matrices get gradient at step 0 (A's only through B, zero here)
    assert all(float(m.q_B.grad.abs().sum()) > 0 for m in lora.adapters.values())


def test_clip_lora_merged_weights_give_the_unmerged_logits(backbone, tmp_path):
    import copy

    lora = create_method("clip_lora", backbone, CLASSES, targets=("q", "k", "v", "o"))
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    lora.eval()
    x = images_for(backbone, 4, seed=4)
    with torch.no_grad():
        unmerged = lora.logits(x)
    lora.export_merged(tmp_path / "merged.safetensors")
    merged_bb = copy.deepcopy(backbone)
    merged_bb.clip.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    zs = create_method("zeroshot", merged_bb, CLASSES, template="a photo of a {}.").eval()
    with torch.no_grad():
        merged = zs.logits(x)
        plain = (
            create_method("zeroshot", backbone, CLASSES, template="a photo of a {}.")
            .eval()
            .logits(x)
        )
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(plain, unmerged, atol=1e-3)  # the adapters do change the logits


def test_clip_lora_dropout_path_equals_merged_path_without_dropout(tiny):
    """The training path (explicit attention with adapter dropout) matches the merged path when
    dropout is off in it: compare a p = 0 module in train mode with the eval logits."""
    lora = create_method("clip_lora", tiny, CLASSES, targets=("q", "k", "v", "o"))
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = images_for(tiny, 3, seed=6)
    lora.eval()
    with torch.no_grad():
        ref = lora.logits(x)
    lora.train()
    object.__setattr__(lora, "config", lora.config.replace(dropout=1e-12))
    with torch.no_grad():
        got = lora(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_clip_lora_epochs_follow_the_iteration_budget(tiny):
    from promptalign.config import OptimConfig, resolve_optim

    lora = create_method("clip_lora", tiny, CLASSES)

    def epochs_for(shots):  # as the engine resolves a run that leaves optim.epochs unset
        budget = lora.config.iteration_budget(shots)
        optim = resolve_optim(
            OptimConfig(), lora.optim_preset, shots, iterations=budget, num_classes=lora.num_classes
        )
        return optim.epochs

    # 500 x 16 iterations at batch 32 over 16 x 5 images: ceil(80 / 32) = 3 steps per epoch
    assert epochs_for(16) == -(-500 * 16 // 3)
    assert epochs_for(1) == 500  # 5 images: one step per epoch
