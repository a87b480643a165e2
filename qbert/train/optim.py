"""The one place optimizers are built, and the numeric precision a training step runs in.

Every stage (fusion, RQ-VAE, pretraining, fine-tuning, the ID baselines) gets its optimizer from
:func:`build_optimizer`: Adam/AdamW with PyTorch's fused kernel wherever it exists (CPU and CUDA
in torch >= 2.4), which updates all parameters in one pass instead of one small kernel per tensor.

Precision: ``fp32`` runs everything in float32; ``bf16`` runs the step's matrix products under
``torch.autocast`` in bfloat16 (weights, optimizer state and the loss reduction stay float32);
``auto`` picks bf16 where the hardware has native bfloat16 matrix units (CUDA with bf16 support,
CPUs with AMX or AVX512-BF16) and fp32 elsewhere, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Literal

import torch
from torch import nn

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")


def build_optimizer(params: nn.Module | Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                    kind: Literal["adamw", "adam"] = "adamw") -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 in the gradient, RecBole's) over the trainable
    parameters, fused where the build supports it, else the multi-tensor ``foreach`` kernel."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = [p for p in params if p.requires_grad]
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[kind]
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return cls(params, lr=lr, weight_decay=weight_decay, foreach=True)


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """``auto`` -> ``bf16`` on hardware with native bf16 matrix units, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision  # type: ignore[return-value]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast region of a training or scoring step at ``precision`` (a no-op for fp32)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
