"""A Hugging Face `transformers` text encoder from a local directory as the text tower
(`model/text=hf`, `model.sharing=separate`): BERT, MiniLM, RoBERTa, ... with the
directory's own tokenizer (`<path>/tokenizer.json`) and a pooling choice.

Loading never runs code from the directory: no remote code, no pickles (the weights must
be `model.safetensors`), no network (local files only).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

from torch import Tensor, nn

from polymodal.models.transformer import pool_text
from polymodal.models.trunk import Stem
from polymodal.utils.cli import one_line
from polymodal.utils.errors import ConfigError

POOLING = ("cls", "mean", "eos")  # BERT's [CLS], sentence-transformers' mean, the last token
KEY = "model.stems.text"


def load_hf_encoder(path: str | Path) -> nn.Module:
    """The `transformers` model of a local directory (config.json + model.safetensors)."""
    directory = Path(path)
    missing = [f for f in ("config.json", "model.safetensors") if not (directory / f).is_file()]
    if missing:
        raise ConfigError(
            f"{KEY}.path: {path} has no {' or '.join(missing)} (a transformers model saved "
            "with save_pretrained; weights as safetensors, never a pickle)"
        )
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ConfigError("model/text=hf needs transformers: pip install 'polymodal[hf]'") from None
    options = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(directory, **options)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{KEY}.path: {path}/config.json: {one_line(str(err))}") from None
    if getattr(config, "auto_map", None):
        raise ConfigError(f"{KEY}.path: {path} needs its own code (auto_map); refused")
    load = partial(
        AutoModel.from_pretrained, directory, config=config, use_safetensors=True, **options
    )
    try:
        try:  # BERT-like models: no pooler, which the tower never uses (no dead weights)
            return load(add_pooling_layer=False)
        except TypeError:
            return load()
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{KEY}.path: {path}: {one_line(str(err))}") from None


class HFTextStem(Stem):
    """Stands for an HF text tower in `model.stems.text`; only `sharing=separate` has one
    (its encoder is the whole HF model, which no shared trunk can hold)."""

    def __init__(self, *args, **kwargs) -> None:
        raise ConfigError(f"{KEY}: an HF text tower (model/text=hf) needs model.sharing=separate")

    @classmethod
    def tower(cls, name: str, stem: Mapping, tower: Mapping) -> nn.Module:
        """The HF model of `stem.path`; the tower's sizes are the directory's own, so
        `model.towers.text` contributes only its LiT keys (read by the model)."""
        stem = dict(stem)
        stem.pop("vocab_size", None)  # the directory's vocabulary (HFTextTower.vocab_size)
        unknown = sorted(set(stem) - {"path", "pool", "context_length"})
        if unknown:
            raise ConfigError(f"{KEY}: {unknown} do not apply to an HF text tower")
        return HFTextTower(**stem)


class HFTextTower(nn.Module):
    """An HF text encoder with the trunk interface: tokens are its last hidden states,
    pooled at [CLS] (`cls`), over the real tokens (`mean`, sentence-transformers) or at the
    last real token (`eos`). Its dropout is off."""

    input_key, mask_key = "text_ids", "text_mask"

    def __init__(self, path: str, pool: str = "cls", context_length: int = 32) -> None:
        super().__init__()
        if pool not in POOLING:
            raise ConfigError(f"{KEY}.pool: one of {POOLING}, got {pool!r}")
        self.model = load_hf_encoder(path)
        # dropout off: the pretrained tower then encodes a text as in evaluation, whether
        # locked (LiT) or tuned, and its modules train like the rest (from_pretrained
        # returns them in eval mode, which Lightning would keep)
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.model.train()
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and context_length > positions:
            raise ConfigError(
                f"data.context_length={context_length} exceeds {path}'s "
                f"max_position_embeddings ({positions})"
            )
        self.pool_type, self.context_length = pool, context_length
        self.width, self.vocab_size = config.hidden_size, config.vocab_size

    def stem(self, modality: str) -> nn.Module:
        return self  # input_key, mask_key, context_length, vocab_size

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if enabled:  # non-reentrant: locked embeddings leave the layers' inputs gradient-free
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        elif self.model.is_gradient_checkpointing:
            self.model.gradient_checkpointing_disable()

    def encode(
        self, modality: str, ids: Tensor, mask: Tensor | None = None, keep: Tensor | None = None
    ) -> Tensor:
        if keep is not None:
            raise ValueError("text tokens cannot be dropped (keep=) before the encoder")
        if mask is None:
            raise ValueError("text needs its padding mask (True = real token)")
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def pool(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pool_type != "mean":
            return pool_text(tokens, mask, self.pool_type)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names from input to output: the embeddings, then each layer (the last
        with what follows it, e.g. a final norm), as open_clip's `lock_text` groups an HF
        tower."""
        layers = self.model.get_submodule(self.layer_path())
        names = [name for name, _ in self.named_parameters()]
        prefix = f"model.{self.layer_path()}."
        per_layer = [
            [n for n in names if n.startswith(f"{prefix}{i}.")] for i in range(len(layers))
        ]
        inside = {n for group in per_layer for n in group}
        first = [n for n in names if "embeddings" in n and n not in inside]
        rest = [n for n in names if n not in inside and n not in first]  # e.g. a final norm
        return [first, *per_layer[:-1], per_layer[-1] + rest]

    def layer_path(self) -> str:
        """Where the model keeps its layer list (BERT: encoder.layer)."""
        for name, module in self.model.named_modules():
            if (
                isinstance(module, nn.ModuleList)
                and len(module) == self.model.config.num_hidden_layers
            ):
                return name
        raise ConfigError(
            f"{KEY}.path: no list of {self.model.config.num_hidden_layers} layers found"
        )
