import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import polymodal
from polymodal.data.shapes import render_sample
from polymodal.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_tokenizer
from polymodal.utils.errors import ConfigError
from tests.helpers import train_tiny


def _captions(n: int, seed: int) -> list[str]:
    return [render_sample(np.random.default_rng([seed, i]), image_size=16)[1] for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(_captions(500, seed=0), path, vocab_size=1000)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> TextTokenizer:
    return TextTokenizer(tokenizer_path, context_length=32)


def test_special_ids(tokenizer: TextTokenizer) -> None:
    ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id)
    assert ids == (0, 2, 3, 4)
    assert SPECIAL_TOKENS[1] == "[UNK]"
    assert 5 < tokenizer.vocab_size <= 1000


def test_round_trip(tokenizer: TextTokenizer) -> None:
    captions = _captions(200, seed=1)  # unseen during training
    ids, mask = tokenizer.encode(captions)
    assert mask.sum(dim=1).max() < tokenizer.context_length  # nothing truncated
    assert tokenizer.decode_batch(ids) == captions
    for caption, row in zip(captions[:20], ids[:20], strict=True):
        assert tokenizer.decode(row) == caption
        assert tokenizer.decode(tokenizer.encode([caption])[0][0]) == caption


def test_layout_and_mask(tokenizer: TextTokenizer) -> None:
    ids, mask = tokenizer.encode(["a red circle", "two shapes: a small blue star and a cross"])
    assert ids.shape == mask.shape == (2, 32)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(mask, ids != tokenizer.pad_id)
    for row, row_mask in zip(ids, mask, strict=True):
        length = int(row_mask.sum())
        assert row[0] == tokenizer.bos_id and row[length - 1] == tokenizer.eos_id
        assert row_mask[:length].all() and not row_mask[length:].any()
        assert (row[1 : length - 1] > 4).all()


def test_truncation_keeps_eos(tokenizer_path: Path) -> None:
    short = TextTokenizer(tokenizer_path, context_length=6)
    ids, mask = short.encode([" ".join(["a large red circle"] * 10)])
    assert mask.all()
    assert ids[0, 0] == short.bos_id and ids[0, -1] == short.eos_id
    assert (ids[0, 1:-1] != short.eos_id).all()


def test_pickle(tokenizer: TextTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    captions = _captions(20, seed=2)
    for a, b in zip(clone.encode(captions), tokenizer.encode(captions), strict=True):
        assert torch.equal(a, b)
    assert clone.context_length == tokenizer.context_length


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope"):
        TextTokenizer(path)


# Tokenizers of other models' conventions, trained here on shapes captions (no download).
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert(path: Path, texts: list[str]) -> Path:
    """BERT-style WordPiece: specials first, [CLS] text [SEP], and fixed-length padding
    in the file (as HF model repos often ship it), which polymodal must ignore."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=BERT_SPECIALS, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=64)
    tokenizer.save(str(path))
    return path


def write_byte_bpe(path: Path, texts: list[str], specials: list[str]) -> Path:
    """GPT-2/CLIP-style byte-level BPE; the special tokens are the last ids, as in theirs."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, texts = tmp_path_factory.mktemp("foreign"), _captions(300, seed=3)
    return {
        "bert": write_bert(root / "bert.json", texts),
        "clip": write_byte_bpe(root / "clip.json", texts, ["<|startoftext|>", "<|endoftext|>"]),
        "gpt2": write_byte_bpe(root / "gpt2.json", texts, ["<|endoftext|>"]),
    }


EXPECTED_ROLES = {
    "bert": {"pad": "[PAD]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"},
    "clip": {
        "pad": "<|endoftext|>",
        "bos": "<|startoftext|>",
        "eos": "<|endoftext|>",
        "mask": None,
    },
    "gpt2": {"pad": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>", "mask": None},
}


@pytest.mark.parametrize("style", sorted(EXPECTED_ROLES))
def test_foreign_tokenizers_encode_pad_and_decode(foreign: dict[str, Path], style: str) -> None:
    tokenizer = TextTokenizer(foreign[style], context_length=32)
    assert tokenizer.special_tokens == EXPECTED_ROLES[style]
    # BERT's decoder writes "shapes : a"; compare captions without punctuation
    captions = [c for c in _captions(40, seed=4) if ":" not in c]
    ids, mask = tokenizer.encode(captions)
    assert ids.shape == mask.shape == (len(captions), 32)  # the file's padding to 64 ignored
    assert mask.sum(dim=1).max() < 32  # nothing truncated
    for row, row_mask in zip(ids, mask, strict=True):
        length = int(row_mask.sum())
        assert row[0] == tokenizer.bos_id and row[length - 1] == tokenizer.eos_id
        assert (row[length:] == tokenizer.pad_id).all() and row_mask[:length].all()
        assert not torch.isin(row[1 : length - 1], torch.tensor(list(tokenizer.special_ids))).any()
    assert tokenizer.decode_batch(ids) == captions
    assert tokenizer.decode(ids[0]) == captions[0]
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.special_tokens == tokenizer.special_tokens
    assert torch.equal(clone.encode(captions)[0], ids)


def test_gpt2_special_id_is_the_last_and_never_text(foreign: dict[str, Path]) -> None:
    tokenizer = TextTokenizer(foreign["gpt2"])
    assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.pad_id == tokenizer.vocab_size - 1
    assert tokenizer.special_ids == {tokenizer.eos_id}


def test_roles_from_config_override_detection(foreign: dict[str, Path]) -> None:
    """open_clip pads with id 0 ("!"): mapped by config, decoding still drops it."""
    tokenizer = TextTokenizer(foreign["clip"], special_tokens={"pad": "!", "bos": None})
    assert tokenizer.pad_id == 0 and tokenizer.special_tokens["bos"] == "<|startoftext|>"
    ids, _ = tokenizer.encode(["a red circle"])
    assert ids[0, -1] == 0 and tokenizer.decode(ids[0]) == "a red circle"
    state = tokenizer.__getstate__()
    assert TextTokenizer.from_state(state).pad_id == 0


def test_missing_mask_token_is_one_line_naming_role_file_and_key(foreign: dict[str, Path]):
    tokenizer = TextTokenizer(foreign["gpt2"])
    with pytest.raises(ConfigError) as err:
        _ = tokenizer.mask_id
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{foreign['gpt2']}: no mask token, which the mlm objective needs")
    assert "set data.special_tokens.mask" in message


def test_bad_special_tokens_and_files_are_one_line(foreign: dict[str, Path], tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^data.special_tokens.eos: '</s>' is not a token of"):
        TextTokenizer(foreign["bert"], special_tokens={"eos": "</s>"})
    with pytest.raises(ConfigError, match=r"^data.special_tokens: unknown role\(s\) \['cls'\]"):
        TextTokenizer(foreign["bert"], special_tokens={"cls": "[CLS]"})
    no_eos = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ConfigError, match=r"no_eos.json: no eos token, .*data.special_tokens.eos"):
        TextTokenizer(tmp_path / "no_eos.json")
    for name, text in (("garbage.json", "not json at all"), ("vocab.json", '{"a": 1}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            TextTokenizer(tmp_path / name)
        assert str(err.value).startswith(f"data.tokenizer: {tmp_path / name}: not a HF tokenizers")
        assert "\n" not in str(err.value)


def test_training_with_a_bert_tokenizer(foreign: dict[str, Path], shapes_dir: Path, tmp_path):
    """ALBEF-style MLM masks with [MASK]; the checkpoint carries the roles (polymodal.load)."""
    vocab = TextTokenizer(foreign["bert"]).vocab_size
    overrides = [f"data.tokenizer={foreign['bert']}", f"model.vocab_size={vocab}"]
    checkpoint, _ = train_tiny(tmp_path / "run", shapes_dir, "experiment=mlm", *overrides)
    model = polymodal.load(checkpoint)
    assert model.tokenizer.special_tokens == EXPECTED_ROLES["bert"]
    assert model.encode_text(["a red circle"]).shape[0] == 1
    with pytest.raises(ConfigError, match=r"gpt2.json: no mask token, .*data.special_tokens.mask"):
        train_tiny(
            tmp_path / "gpt2", shapes_dir, "experiment=mlm", f"data.tokenizer={foreign['gpt2']}"
        )
