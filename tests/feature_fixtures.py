"""Tiny offline encoders and a tiny multimodal dataset, for tests and smoke runs (no downloads).

They are real models saved in the real on-disk formats (``save_pretrained``; open_clip's
``local-dir:`` folder or a checkpoint file + model config), so loading them goes through the
same code as a full-size LLaMA or CLIP checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def make_tiny_llama(directory: str | Path, texts: list[str], seed: int = 0, pad_token: bool = False) -> Path:
    """A random 2-layer ``LlamaModel`` + a word-level fast tokenizer trained on ``texts``.

    Like real LLaMA tokenizers it has no pad token unless ``pad_token`` (the encoder pads with eos).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad_token else [])
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   **({"pad_token": "<pad>"} if pad_token else {}))
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    LlamaModel(cfg).eval().save_pretrained(directory)
    return directory


def make_tiny_clip(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """A random tiny open_clip ViT saved two ways; returns the config values that load it.

    ``local_dir``: ``local-dir:<dir>/local`` (open_clip_config.json + weights);
    ``config_file`` + ``checkpoint``: a model-config JSON (registered by name) + a state dict.
    """
    import open_clip

    directory = Path(directory)
    (directory / "local").mkdir(parents=True, exist_ok=True)
    name = "qbert-tiny-vit"
    cfg_file = directory / f"{name}.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG).eval()
    ckpt = directory / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    (directory / "local" / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"image_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.save(model.state_dict(), directory / "local" / "open_clip_pytorch_model.bin")
    return {"local_dir": f"local-dir:{directory / 'local'}", "name": name, "config_file": str(cfg_file),
            "checkpoint": str(ckpt)}


def write_images(directory: str | Path, n: int, seed: int = 0) -> list[str]:
    """``n`` small random images, alternating PNG and JPEG; returns their file names."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img{i}.{'png' if i % 2 == 0 else 'jpg'}"
        arr = rng.integers(0, 256, size=(24 + i % 5, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(directory / name)
        names.append(name)
    return names


def tiny_items(n: int, images: list[str | None] | None = None) -> pa.Table:
    """An items table with Amazon-style text columns (title, brand, categories, description)."""
    words = ["guitar", "string", "amp", "pedal", "drum", "stick", "cable", "tuner", "strap", "pick"]
    rng = np.random.default_rng(1)
    cols = {
        "item_id": pa.array(np.arange(n, dtype=np.int64)),
        "orig_id": pa.array([f"B{i:05d}" for i in range(n)]),
        "title": pa.array([" ".join(rng.choice(words, size=2 + i % 4)) for i in range(n)]),
        "brand": pa.array([None if i % 3 == 0 else f"brand{i % 4}" for i in range(n)]),
        "categories": pa.array([["Music", words[i % len(words)]] for i in range(n)], pa.list_(pa.string())),
        "description": pa.array(["" if i % 2 else " ".join(rng.choice(words, size=6)) for i in range(n)]),
    }
    if images is not None:
        cols["image"] = pa.array(images, pa.string())
    return pa.table(cols)
