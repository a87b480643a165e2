"""Image encoder: the vision tower of an open_clip model with that model's eval transform.

The paper's image features are CLIP ViT-L/14 embeddings (MQL4GRec). Only ``model.visual`` is
kept (the text tower is dropped after loading), and outputs are L2-normalised as CLIP's
``encode_image(normalize=True)``. Images come from local paths or ``s3://`` URIs.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbert.features import storage
from qbert.features.config import ImageEncoderConfig
from qbert.features.text import resolve_dtype
from qbert.utils.runtime import pick_device

log = logging.getLogger("qbert.features")


class ImageLoadError(OSError):
    """An image is missing or cannot be decoded; the message names the file."""


def load_image(uri: str, endpoint: str | None = None) -> Any:
    """A decoded RGB ``PIL.Image``; :class:`ImageLoadError` naming ``uri`` when missing or corrupt."""
    from PIL import Image

    try:
        data = storage.read_bytes(uri, endpoint)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {uri}") from None
    except OSError as e:
        raise ImageLoadError(f"cannot read image {uri}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")  # forces a full decode: truncated files fail here
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
        raise ImageLoadError(f"corrupt or unreadable image {uri}: {type(e).__name__}: {e}") from None


def resolve_image_uri(value: str, root: str) -> str:
    """Absolute paths and URIs stay; relative paths are taken under ``root``."""
    if storage.is_s3(value) or Path(value).is_absolute():
        return value
    return storage.join(root, value)


class ImageEncoder:
    """Loads once (per actor); :meth:`encode` maps decoded images to unit float32 vectors."""

    def __init__(self, cfg: ImageEncoderConfig, device: str | torch.device = "auto", endpoint: str | None = None):
        import open_clip

        self.cfg = cfg
        self.endpoint = endpoint
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.model_config_file:
            if not Path(cfg.model_config_file).is_file():
                raise FileNotFoundError(f"open_clip model config not found: {cfg.model_config_file}")
            open_clip.add_model_config(cfg.model_config_file)
        pretrained = cfg.pretrained
        if pretrained:
            ckpt = Path(pretrained).expanduser()
            if ckpt.is_file():
                pretrained = str(ckpt)
            elif "/" in pretrained or ckpt.suffix in (".pt", ".pth", ".bin", ".safetensors"):
                raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=pretrained, device="cpu", cache_dir=cfg.cache_dir)
        except (RuntimeError, ValueError) as e:
            raise FileNotFoundError(f"cannot create open_clip model {cfg.model!r} (pretrained={pretrained!r}): {e}") from e
        self.visual = model.visual.to(self.device, self.dtype).eval()
        del model  # the text tower is not needed
        self.preprocess = preprocess
        self.dim = int(getattr(self.visual, "output_dim", 0)) or self._probe_dim()
        log.info("image encoder %s (pretrained=%s) on %s (%s), dim %d", cfg.model, pretrained, self.device, self.dtype, self.dim)

    def _probe_dim(self) -> int:
        size = getattr(self.visual, "image_size", (224, 224))
        size = size if isinstance(size, (tuple, list)) else (size, size)
        with torch.inference_mode():
            x = torch.zeros(1, 3, *size, device=self.device, dtype=self.dtype)
            return int(self.visual(x).shape[-1])

    def load_many(self, uris: list[str], threads: int = 8) -> list[Any]:
        """Decoded images, or the :class:`ImageLoadError` instance for each one that failed."""

        def one(u: str) -> Any:
            try:
                return load_image(u, self.endpoint)
            except ImageLoadError as e:
                return e

        if len(uris) <= 1:
            return [one(u) for u in uris]
        with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
            return list(pool.map(one, uris))

    @torch.inference_mode()
    def encode(self, images: list[Any]) -> np.ndarray:
        """float32 [len(images), dim], each row L2-normalised."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        bs = self.cfg.batch_size
        for start in range(0, len(images), bs):
            x = torch.stack([self.preprocess(im) for im in images[start:start + bs]])
            feats = self.visual(x.to(self.device, self.dtype)).float()
            out[start:start + len(x)] = torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()
        return out
