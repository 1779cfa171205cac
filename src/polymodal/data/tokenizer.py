"""Byte-level BPE text tokenizer (HF ``tokenizers``) with fixed-length batch encoding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from polymodal.utils.files import atomic_write_text

PAD = "[PAD]"
UNK = "[UNK]"
BOS = "[BOS]"
EOS = "[EOS]"
MASK = "[MASK]"
# Order fixes the ids: pad=0, unk=1, bos=2, eos=3, mask=4.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, MASK)


def train_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 1000) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``path`` (tokenizer.json).

    Byte-level pre-tokenization covers every input string without unknown tokens and decodes
    lowercase NFKC text back exactly. The file is written atomically (readers never see half).
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tokenizer.to_str(pretty=True))  # what tokenizer.save writes
    return tokenizer


class TextTokenizer:
    """Encodes batches of text to ``[B, context_length]`` ids: BOS + tokens + EOS + padding."""

    def __init__(self, path: str | Path, context_length: int = 32) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOS + EOS), got {context_length}")
        self._context_length = context_length
        self._set_tokenizer(Tokenizer.from_file(str(path)))

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
        self._pad_id, _, self._bos_id, self._eos_id, self._mask_id = ids

    @classmethod
    def from_state(cls, state: dict) -> TextTokenizer:
        """A tokenizer from `__getstate__`'s dict (how checkpoints carry it)."""
        tokenizer = cls.__new__(cls)
        tokenizer.__setstate__(state)
        return tokenizer

    # Pickle via the JSON string so the tokenizer can be sent to DataLoader worker processes.
    def __getstate__(self) -> dict:
        return {"json": self._tokenizer.to_str(), "context_length": self._context_length}

    def __setstate__(self, state: dict) -> None:
        self._context_length = state["context_length"]
        self._set_tokenizer(Tokenizer.from_str(state["json"]))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids, mask), both ``[B, context_length]``; mask is True for real tokens.

        Long texts are truncated before EOS, so every row ends its real tokens with EOS.
        """
        max_tokens = self._context_length - 2
        ids = torch.full((len(texts), self._context_length), self._pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            tokens = [self._bos_id, *encoding.ids[:max_tokens], self._eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            lengths[row] = len(tokens)
        mask = torch.arange(self._context_length) < lengths[:, None]
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Decode one sequence; the byte-level prefix space is stripped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special).strip()

    def decode_batch(
        self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special: bool = True
    ) -> list[str]:
        """Decode a batch of sequences (e.g. a ``[B, L]`` tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        texts = self._tokenizer.decode_batch([list(row) for row in ids], skip_special)
        return [text.strip() for text in texts]
