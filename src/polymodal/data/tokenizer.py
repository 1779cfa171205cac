"""Text tokenizer: any HF ``tokenizers`` tokenizer.json, fixed-length batch encoding.

The special tokens polymodal needs are roles (pad, bos, eos, mask), each mapped to a token
of the file: set by `data.special_tokens`, else detected by the conventions in
`ROLE_TOKENS`. The built-in datasets train a byte-level BPE with `train_tokenizer`.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from polymodal.utils.errors import ConfigError
from polymodal.utils.files import atomic_write_text

PAD = "[PAD]"
UNK = "[UNK]"
BOS = "[BOS]"
EOS = "[EOS]"
MASK = "[MASK]"
# What `train_tokenizer` writes; the order fixes the ids: pad=0, unk=1, bos=2, eos=3, mask=4.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, MASK)
# Tokens that play each role by convention, first match wins: polymodal's own, BERT
# WordPiece ([CLS] text [SEP]), CLIP and GPT-2 BPE (<|startoftext|>, <|endoftext|>; open_clip's
# <start_of_text>, <end_of_text>),
# RoBERTa/sentencepiece (<s>, </s>). Without a pad or bos token of its own, a tokenizer
# reuses eos (GPT-2 and HF's CLIP convention; open_clip pads with id 0, the token "!",
# which decoding could not tell from text): padding is hidden by the attention mask, so
# its id never reaches the model. mask is needed only by the mlm objective.
ROLE_TOKENS = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "bos": ("[BOS]", "[CLS]", "<|startoftext|>", "<start_of_text>", "<s>", "<bos>"),
    "eos": ("[EOS]", "[SEP]", "<|endoftext|>", "<end_of_text>", "</s>", "<eos>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
}


# open_clip's (OpenAI CLIP's) BPE: its merges file, token pattern and special tokens
CLIP_MERGES = 49152 - 256 - 2  # merges open_clip reads from bpe_simple_vocab_16e6.txt.gz
CLIP_PATTERN = (
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
CLIP_SPECIAL_TOKENS = {"bos": "<start_of_text>", "eos": "<end_of_text>"}
CLIP_VOCAB_SIZE = 512 + CLIP_MERGES + 2  # byte tokens (with and without </w>), merges, specials


def clip_clean(text: str) -> str:
    """open_clip's text cleaning before its BPE (mojibake and HTML entities fixed), which a
    tokenizer.json cannot express: TextTokenizer applies it for a CLIP BPE tokenizer."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clip_bpe_tokenizer(bpe_path: str | Path) -> Tokenizer:
    """open_clip's tokenizer (`open_clip.tokenize`, OpenAI CLIP's BPE) as a HF tokenizers
    Tokenizer, built from its merges file (`bpe_simple_vocab_16e6.txt.gz`, shipped in
    the open_clip package): whitespace collapsed, lowercased, byte-level BPE with the
    `</w>` word suffix; with `clip_clean` first (TextTokenizer does it), open_clip's ids."""
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")[1 : CLIP_MERGES + 1]
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ConfigError(f"{bpe_path}: not a CLIP BPE merges file (.txt.gz): {err}") from None
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise ConfigError(f"{bpe_path}: not a CLIP BPE merges file ({CLIP_MERGES} merges expected)")
    # open_clip's order: the byte characters in bytes_to_unicode order (the printable
    # bytes as themselves, then the rest from chr(256) up: ascending code points), the
    # same with </w>, the merges, the two special tokens
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [CLIP_SPECIAL_TOKENS["bos"], CLIP_SPECIAL_TOKENS["eos"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    tokenizer.add_special_tokens(list(CLIP_SPECIAL_TOKENS.values()))
    return tokenizer


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
    """Encodes batches of text to ``[B, context_length]`` ids: BOS + tokens + EOS + padding.

    `special_tokens` maps roles (pad, bos, eos, mask) to tokens of the file; a role left
    out or None is detected (`ROLE_TOKENS`). A file that does not parse, or lacks an eos
    token, is a one-line ConfigError naming it.
    """

    def __init__(
        self,
        path: str | Path,
        context_length: int = 32,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if context_length < 2:
            raise ConfigError(f"data.context_length must be >= 2 (BOS + EOS), got {context_length}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"data.tokenizer: {path}: not a HF tokenizers tokenizer.json ({reason})"
            ) from None
        self._context_length = context_length
        self._set_tokenizer(tokenizer, special_tokens or {}, str(path))

    def _set_tokenizer(
        self, tokenizer: Tokenizer, special_tokens: Mapping[str, str | None], source: str
    ) -> None:
        # encode lays out every row itself: padding or truncation the file may ask for
        # (common in tokenizer.json files of HF models) would shift it
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer, self._source = tokenizer, source
        # open_clip's BPE (its start token) comes with open_clip's cleaning
        self._clean = (
            clip_clean if tokenizer.token_to_id(CLIP_SPECIAL_TOKENS["bos"]) is not None else None
        )
        unknown = sorted(set(special_tokens) - set(ROLE_TOKENS))
        if unknown:
            raise ConfigError(
                f"data.special_tokens: unknown role(s) {unknown}; roles are {list(ROLE_TOKENS)}"
            )
        tokens: dict[str, str | None] = {}
        for role, candidates in ROLE_TOKENS.items():
            token = special_tokens.get(role)
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ConfigError(
                    f"data.special_tokens.{role}: {token!r} is not a token of {source}"
                )
            if token is None:
                token = next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)
            tokens[role] = token
        if tokens["eos"] is None:
            raise ConfigError(self._missing("eos", "every caption ends with (text pooling)"))
        tokens["pad"] = tokens["pad"] or tokens["eos"]
        tokens["bos"] = tokens["bos"] or tokens["eos"]
        self._tokens = tokens
        self._ids = {r: None if t is None else tokenizer.token_to_id(t) for r, t in tokens.items()}
        added = tokenizer.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        self._special_ids = special | {i for i in self._ids.values() if i is not None}

    def _missing(self, role: str, needed_by: str) -> str:
        looked = ", ".join(ROLE_TOKENS[role])
        return (
            f"{self._source}: no {role} token, which {needed_by} (looked for {looked}); "
            f"set data.special_tokens.{role} to the token of that file that plays this role"
        )

    @classmethod
    def from_state(cls, state: dict) -> TextTokenizer:
        """A tokenizer from `__getstate__`'s dict (how checkpoints carry it)."""
        tokenizer = cls.__new__(cls)
        tokenizer.__setstate__(state)
        return tokenizer

    # Pickle via the JSON string so the tokenizer can be sent to DataLoader worker processes.
    def __getstate__(self) -> dict:
        return {
            "json": self._tokenizer.to_str(),
            "context_length": self._context_length,
            "special_tokens": dict(self._tokens),
            "source": self._source,
        }

    def __setstate__(self, state: dict) -> None:
        self._context_length = state["context_length"]
        # checkpoints from before role mapping hold neither: detection finds [PAD] ... [MASK]
        self._set_tokenizer(
            Tokenizer.from_str(state["json"]),
            state.get("special_tokens") or {},
            state.get("source", "the checkpoint's tokenizer"),
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The token of each role (mask None when the file has none)."""
        return dict(self._tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never text: every role's and the file's own special tokens."""
        return frozenset(self._special_ids)

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def mask_id(self) -> int:
        """The mask token's id; a ConfigError naming the file when it has none."""
        if self._ids["mask"] is None:
            raise ConfigError(self._missing("mask", "the mlm objective needs"))
        return self._ids["mask"]

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids, mask), both ``[B, context_length]``; mask is True for real tokens.

        Long texts are truncated before EOS, so every row ends its real tokens with EOS.
        """
        max_tokens = self._context_length - 2
        ids = torch.full((len(texts), self._context_length), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        texts = [self._clean(t) for t in texts] if self._clean else list(texts)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            tokens = [self.bos_id, *encoding.ids[:max_tokens], self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            lengths[row] = len(tokens)
        mask = torch.arange(self._context_length) < lengths[:, None]
        return ids, mask

    def prompt_ids(self, text: str) -> list[int]:
        """BOS and the tokens of `text`, no EOS: a prefix for the decoder to continue."""
        text = self._clean(text) if self._clean else text.strip()
        return [self.bos_id, *self._tokenizer.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Decode one sequence; the byte-level prefix space is stripped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.decode_batch([ids], skip_special)[0]

    def decode_batch(
        self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special: bool = True
    ) -> list[str]:
        """Decode a batch of sequences (e.g. a ``[B, L]`` tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # role tokens mapped to ordinary vocabulary entries are not special to tokenizers
        rows = [[i for i in row if not (skip_special and i in self._special_ids)] for row in ids]
        texts = self._tokenizer.decode_batch(rows, skip_special)
        return [text.strip() for text in texts]
