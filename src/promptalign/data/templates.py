"""Prompt templates beyond the per-dataset ones each reader declares."""

# The 7 "select" ImageNet templates of the CLIP paper, used as the ensemble option.
IMAGENET_SELECT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
