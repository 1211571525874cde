"""The error raised for a tower promptalign has no prompt seam for."""

from __future__ import annotations


class UnsupportedTower(ValueError):
    """A model's tower lacks a seam prompt learning needs; the message names the seam.

    Attributes:
        tower: "vision" or "text".
        seam: what is missing, in words.
        fix: what to do instead.
        arch: the architecture, when known.
    """

    def __init__(self, tower: str, seam: str, fix: str, arch: str | None = None):
        self.tower, self.seam, self.fix, self.arch = tower, seam, fix, arch
        where = f"architecture {arch!r}: " if arch else ""
        super().__init__(f"{where}unsupported {tower} tower: missing seam: {seam}; {fix}")
