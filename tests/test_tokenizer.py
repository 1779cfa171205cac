import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.data.shapes import render_sample
from polymodal.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_tokenizer


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
