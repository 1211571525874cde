"""Hardware defaults and a compiled training step (issue 15, items 4 and 6).

Two mechanisms the engine switches on from its config; neither changes any number beyond
floating-point reordering:

* :func:`resolve_amp` turns ``optim.amp = "auto"`` into a concrete autocast choice: none on CPU;
  on CUDA bf16 for training (fp32's exponent range: no loss scaling needed) and fp16 for
  evaluation (three more mantissa bits than bf16, and CLIP inference stays far inside fp16's
  range; OpenAI trained CLIP in fp16). Everything after the features in the OT scorers is fp32
  whatever the autocast dtype (``promptalign.ot``).
* :func:`compile_step` wraps a training step (the trainer's ``_Step`` module, or any callable)
  in ``torch.compile`` with static shapes. Small-batch steps are launch-bound (30-80 ms on an
  H100 whatever the batch), so fusing the prompted towers' elementwise work and, with
  ``compile_mode="reduce-overhead"``, replaying them as CUDA graphs, attacks the launch cost.
  The OT solvers are excluded from tracing (``torch.compiler.disable`` in ``promptalign.ot``):
  their per-problem early stopping is data-dependent and the token level is already one GEMM +
  one Triton kernel, so the compiled graph breaks around them and they run eagerly.
  ``mode="auto"`` compiles on CUDA only: on CPU the compile time (tens of seconds per shape on
  2 cores) outweighs any gain for the short runs a CPU does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch

log = logging.getLogger(__name__)

AmpChoice = Literal["auto", "none", "bf16", "fp16"]
CompileChoice = Literal["auto", "on", "off"]


def resolve_amp(amp: str, device: torch.device | str, *, training: bool) -> str:
    """``"auto"`` -> "none" on CPU, "bf16" (training) / "fp16" (evaluation) on CUDA; else ``amp``.

    Training falls back to fp16 on CUDA devices without bf16 (the trainer's GradScaler then
    scales the loss).
    """
    if amp not in ("auto", "none", "bf16", "fp16"):
        raise ValueError(f"amp {amp!r} unknown; use 'auto', 'none', 'bf16' or 'fp16'")
    if amp != "auto":
        return amp
    device = torch.device(device)
    if device.type != "cuda":
        return "none"
    if not training:
        return "fp16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def compile_step(
    step: Callable,
    mode: CompileChoice = "auto",
    *,
    device: torch.device | str | None = None,
    backend: str = "inductor",
    compile_mode: str | None = None,
) -> Callable:
    """The training step, compiled with ``torch.compile`` when ``mode`` asks for it.

    Args:
        step: an ``nn.Module`` or callable computing the step (e.g. ``images, labels -> dict``).
        mode: "off" (return ``step``), "on" (always compile), "auto" (compile on CUDA only).
        device: where the step runs (for "auto"); default: CUDA if available.
        backend: ``torch.compile`` backend ("inductor"; "aot_eager" traces without code
            generation, for checks).
        compile_mode: ``torch.compile`` mode, e.g. "reduce-overhead" (CUDA graphs over the
            compiled regions; inputs must keep their shapes, i.e. ``drop_last`` batches).

    Returns:
        A callable with ``step``'s signature (a compiled module is returned for a module, so it
        can still be wrapped by DistributedDataParallel or called the same way).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile mode {mode!r} unknown; use 'auto', 'on' or 'off'")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if mode == "off" or (mode == "auto" and torch.device(device).type != "cuda"):
        return step
    log.info("compiling the training step (backend=%s, mode=%s)", backend, compile_mode)
    return torch.compile(step, dynamic=False, backend=backend, mode=compile_mode)
