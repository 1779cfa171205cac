"""PolymodalModel: the modality encoders, projections, fusion encoder, decoder, heads and
contrastive temperature of one run, built from `model.*` config.

Modalities are registered by name (`model.stems.<name>`: a `Stem` class and its kwargs;
`model.towers.<name>`: its encoder under `sharing=separate`); `model.modalities` picks the
ones a run builds. They share one interface:
`encode(modality, x, mask, keep) -> tokens`, `pool`, `project`, `embed`. `model.sharing`
picks how they share weights:

- `separate`: one encoder per modality (a timm model or our trunk for images; CLIP);
- `multiway`: one trunk, shared attention, a feed-forward expert per modality (VLMo);
- `shared`: one trunk with all weights shared.

`model.parts` lists the optional parts to build (the app adds what `task.objectives`
need), so a CLIP run carries no unused weights and a checkpoint rebuilds from its model
config alone. Objectives only turn the outputs of these parts into losses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from hydra.utils import get_class
from timm.layers import freeze_batch_norm_2d
from timm.models.vision_transformer import Block as TimmBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from polymodal.models.decoder import CaptionDecoder, DecoderBlock
from polymodal.models.fusion import FusionEncoder
from polymodal.models.generation import generate
from polymodal.models.heads import MAEDecoder, MLMHead
from polymodal.models.transformer import Block
from polymodal.models.trunk import Stem, Trunk
from polymodal.utils.errors import ConfigError
from polymodal.utils.instantiate import plain_dict

SHARING = ("separate", "multiway", "shared")
# optional parts and the parts each one needs
PARTS = {
    "logit_scale": (),
    "logit_bias": ("logit_scale",),
    "fusion": (),
    "itm_head": ("fusion",),
    "mlm_head": ("fusion",),
    "mim_decoder": (),
    "decoder": (),
    "classifier": ("logit_scale",),
}
SHARED_ENCODER = "trunk"  # the encoders' key of the one trunk of multiway/shared
# LiT settings of `model.towers.<modality>` (read by the model, not passed to the tower)
LOCK_KEYS = ("lock", "unlocked_groups", "freeze_bn_stats")
# the Transformer blocks: FSDP's units, and what model.compile compiles one by one
BLOCK_CLASSES = (Block, DecoderBlock, TimmBlock)
BATCH_NORM = nn.modules.batchnorm._BatchNorm  # every BatchNorm class (1d, 2d, sync, ...)


def with_dependencies(parts: Sequence[str]) -> list[str]:
    """`parts` plus every part they need, in PARTS order; unknown names are a ConfigError."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"model.parts: unknown {unknown} (known: {list(PARTS)})")
    wanted = set(parts)
    for part in parts:
        wanted.update(PARTS[part])
    return [p for p in PARTS if p in wanted]


def stem_class(name: str, spec: Mapping) -> tuple[type[Stem], dict]:
    """The Stem class of `model.stems.<name>` and its kwargs."""
    kwargs = dict(spec)
    target = kwargs.pop("_target_", None)
    cls = get_class(target) if isinstance(target, str) else None
    if not (isinstance(cls, type) and issubclass(cls, Stem)):
        raise ConfigError(f"model.stems.{name}._target_: {target!r} is no Stem class")
    return cls, kwargs


def select_stems(stems: Mapping[str, Mapping], modalities: Sequence[str] | None) -> dict:
    """The stems of `modalities` (None: all), in `model.stems` order: the order modules
    are built in, which fixes a seed's initial weights."""
    if modalities is None:
        return dict(stems)
    missing = [m for m in modalities if m not in stems]
    if missing or not modalities:
        raise ConfigError(f"model.modalities: {missing or '[]'} (model.stems has {list(stems)})")
    return {m: spec for m, spec in stems.items() if m in modalities}


def build_encoders(
    sharing: str, stems: Mapping[str, Mapping], towers: Mapping[str, Mapping], trunk: Mapping
) -> tuple[nn.ModuleDict, dict[str, str]]:
    """The encoders and which one encodes each modality."""
    if sharing not in SHARING:
        raise ConfigError(f"model.sharing must be one of {SHARING}, got {sharing!r}")
    if sharing == "separate":
        encoders = {}
        for name, spec in stems.items():
            if name not in towers:
                raise ConfigError(f"model.towers.{name}: required with model.sharing=separate")
            cls, kwargs = stem_class(name, spec)
            encoders[name] = cls.tower(name, kwargs, towers[name])
        return nn.ModuleDict(encoders), {name: name for name in stems}
    width = trunk.get("width", 128)
    built = {}
    for name, spec in stems.items():
        cls, kwargs = stem_class(name, spec)
        built[name] = cls(width=width, **kwargs)
    shared = Trunk(built, multiway=sharing == "multiway", **trunk)
    return nn.ModuleDict({SHARED_ENCODER: shared}), {name: SHARED_ENCODER for name in built}


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of `module` (BatchNorm statistics) on exit: for passes that
    must leave no trace, as a checkpointed chunk's recomputation or a FLOP count."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def checkpoint_contexts(module: nn.Module) -> tuple:
    """(forward, recomputation) contexts of a checkpointed `module`: the backward pass's
    recomputation must not count its batch a second time in BatchNorm statistics."""
    return nullcontext(), buffers_kept(module)


class PolymodalModel(nn.Module):
    def __init__(
        self,
        stems: Mapping[str, Mapping],
        modalities: Sequence[str] | None = None,
        towers: Mapping[str, Mapping] | None = None,
        trunk: Mapping | None = None,
        vocab_size: int | None = None,
        embed_dim: int = 128,
        sharing: str = "separate",
        parts: Sequence[str] = (),
        logit_scale: Mapping | None = None,
        logit_bias: Mapping | None = None,
        fusion: Mapping | None = None,
        decoder: Mapping | None = None,
        mim_decoder: Mapping | None = None,
        classifier: Mapping | None = None,
        grad_checkpointing: bool = False,
        micro_batch_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if vocab_size is None:
            raise ConfigError("model.vocab_size is unset: it must cover the tokenizer")
        self.sharing, self.vocab_size, self.embed_dim = sharing, vocab_size, embed_dim
        # only the built stems are resolved: an unused one may refer to absent data config
        stems = {m: plain_dict(spec) for m, spec in select_stems(stems, modalities).items()}
        towers, trunk = plain_dict(towers), plain_dict(trunk)
        locks = {m: {k: spec.pop(k) for k in LOCK_KEYS if k in spec} for m, spec in towers.items()}
        self.encoders, self.encoder_of = build_encoders(sharing, stems, towers, trunk)
        if "text" in self.encoder_of:  # a pretrained text tower has its own vocabulary
            vocab_size = getattr(self.stem("text"), "vocab_size", vocab_size)
            self.vocab_size = vocab_size
        self.projections = nn.ModuleDict(
            {m: nn.Linear(self.width(m), embed_dim, bias=False) for m in self.encoder_of}
        )
        self.parts = with_dependencies(list(parts))
        scale = plain_dict(logit_scale)
        self.max_log_scale = math.log(scale.get("max", 100.0))
        # shape [1], not a 0-d scalar: FSDP cannot shard scalar parameters
        self.logit_scale = self.logit_bias = None
        if "logit_scale" in self.parts:
            init = math.log(scale.get("init") or 1 / 0.07)
            self.logit_scale = nn.Parameter(torch.full((1,), init))
        if "logit_bias" in self.parts:
            bias = plain_dict(logit_bias).get("init")
            self.logit_bias = nn.Parameter(torch.full((1,), -10.0 if bias is None else float(bias)))
        self.fusion = self.decoder = self.itm_head = self.mlm_head = self.mim_decoder = None
        fusion, decoder = plain_dict(fusion), plain_dict(decoder)
        # which modality's tokens the fusion encoder and the decoder attend to (None: the
        # model's first modality besides text, as contrastive pairs default to)
        self.fusion_memory = fusion.pop("memory", None) or self.paired_modality
        # a model of text alone: a decoder without cross-attention (a language model)
        self.decoder_memory = decoder.pop("memory", None) or (
            None if self.paired_modality == "text" else self.paired_modality
        )
        if "fusion" in self.parts:
            self.fusion = FusionEncoder(
                width=self.width("text"), memory_dim=self.width(self.fusion_memory), **fusion
            )
        if "itm_head" in self.parts:
            self.itm_head = nn.Linear(self.width("text"), 2)
        if "mlm_head" in self.parts:
            self.mlm_head = MLMHead(self.width("text"), vocab_size)
        if "mim_decoder" in self.parts:
            stem = self.stem("image")
            if getattr(stem, "patch_size", None) is None:
                raise ConfigError("model.parts.mim_decoder needs a ViT image encoder with patches")
            self.mim_decoder = MAEDecoder(
                memory_dim=self.width("image"),
                num_patches=stem.num_patches,
                num_prefix_tokens=stem.num_prefix_tokens,
                patch_pixels=stem.patch_size**2 * 3,
                **plain_dict(mim_decoder),
            )
        if "decoder" in self.parts:
            self.decoder = CaptionDecoder(
                vocab_size=vocab_size,
                context_length=self.stem("text").context_length,
                memory_dim=self.decoder_memory and self.width(self.decoder_memory),
                **decoder,
            )
        self.classifier = None
        if "classifier" in self.parts:
            num_classes = plain_dict(classifier).get("num_classes")
            if not isinstance(num_classes, int) or num_classes < 2:
                raise ConfigError(
                    "model.classifier.num_classes: the classify objective's head needs the "
                    f"number of classes of its attribute (>= 2), got {num_classes!r}"
                )
            self.classifier = nn.Linear(embed_dim, num_classes)
            # set once the head has its start (zero-shot, or trained): travels with the
            # weights, so a resumed run, a spawned rank or init_from of a fine-tuned
            # checkpoint never starts it again
            self.register_buffer("classifier_started", torch.zeros(1, dtype=torch.bool))
        self.set_grad_checkpointing(grad_checkpointing)
        for modality, settings in locks.items():
            if settings.get("lock") and modality in self.encoder_of:
                self.lock(
                    modality,
                    settings.get("unlocked_groups", 0),
                    settings.get("freeze_bn_stats", False),
                )
        self.micro_batch_size = micro_batch_size
        if compile:
            for module in self.modules():
                if isinstance(module, BLOCK_CLASSES):
                    module.compile()  # in place: the state dict keeps its keys

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every Transformer block's activations in backward (timm's convention:
        each block stack has a `grad_checkpointing` flag)."""
        self.grad_checkpointing = enabled
        for module in self.modules():
            if hasattr(module, "set_grad_checkpointing") and module is not self:
                module.set_grad_checkpointing(enabled)  # timm models
            elif hasattr(module, "grad_checkpointing") and module is not self:
                module.grad_checkpointing = enabled

    def lock(self, modality: str, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """LiT (open_clip's lock_image / lock_text): the modality's tower and projection
        stop training, but for their last `unlocked_groups` layer groups (timm's groups,
        then the projection as the last one). Locked parameters get no gradient and no
        optimizer state. With `freeze_bn_stats` the BatchNorm layers of locked groups
        keep their running statistics (timm's FrozenBatchNorm2d)."""
        key = f"model.towers.{modality}"
        if self.sharing != "separate":
            raise ConfigError(
                f"{key}.lock: needs model.sharing=separate (under {self.sharing} one trunk "
                "encodes every modality)"
            )
        prefix = f"encoders.{self.encoder_of[modality]}."
        groups = [
            [prefix + name for name in group] for group in self.encoder(modality).layer_groups()
        ]
        groups.append(
            [
                f"projections.{modality}.{n}"
                for n, _ in self.projections[modality].named_parameters()
            ]
        )
        if not 0 <= unlocked_groups < len(groups):
            raise ConfigError(
                f"{key}.unlocked_groups: must be in [0, {len(groups) - 1}] (the tower has "
                f"{len(groups)} layer groups with its projection), got {unlocked_groups}"
            )
        locked = {name for group in groups[: len(groups) - unlocked_groups] for name in group}
        for name, param in self.named_parameters():
            if name in locked:
                param.requires_grad_(False)
        if not freeze_bn_stats:
            return
        for name, module in list(self.named_modules()):
            params = [f"{name}.{n}" for n, _ in module.named_parameters()]
            if isinstance(module, BATCH_NORM) and params and set(params) <= locked:
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent), child, freeze_batch_norm_2d(module))

    def part(self, name: str) -> nn.Module | Tensor:
        """An optional part, or a ConfigError saying how to build it."""
        module = getattr(self, name) if name in PARTS else None
        if module is None:
            raise ConfigError(f"this model has no {name} (model.parts: {self.parts})")
        return module

    # -- unimodal ------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.encoder_of)

    @property
    def paired_modality(self) -> str:
        """What this model's texts describe: its first modality besides text (image, or
        audio for `model.modalities=[audio, text]`); the default of contrastive pairs, the
        fusion encoder's and the decoder's memory, and of validation."""
        return next((m for m in self.modalities if m != "text"), "text")

    def encoder(self, modality: str) -> nn.Module:
        if modality not in self.encoder_of:
            raise ConfigError(f"this model has no {modality} encoder (has {self.modalities})")
        return self.encoders[self.encoder_of[modality]]

    def stem(self, modality: str) -> nn.Module:
        """The modality's input layer (patch size, number of patches, text embedding)."""
        return self.encoder(modality).stem(modality)

    def width(self, modality: str) -> int:
        return self.encoder(modality).width

    def input_key(self, modality: str) -> str:
        """The collated batch's key of a modality's input (a timm tower's: the modality)."""
        return getattr(self.stem(modality), "input_key", modality)

    def inputs(self, batch: Mapping, modality: str) -> tuple[Tensor, Tensor | None]:
        """(input, padding mask or None) of a modality in a collated batch."""
        mask_key = getattr(self.stem(modality), "mask_key", None)
        return batch[self.input_key(modality)], None if mask_key is None else batch[mask_key]

    def encode(
        self, modality: str, x: Tensor, mask: Tensor | None = None, keep: Tensor | None = None
    ) -> Tensor:
        """Tokens [B, L, width]; with `keep` [B, K] only those patches (plus prefix).

        With `micro_batch_size` the batch is encoded in chunks of that many samples, each
        under activation checkpointing: only the chunks' output tokens are kept for the
        backward pass, which recomputes one chunk at a time. A contrastive loss over the
        whole batch then has its exact loss and gradients (every negative) with the
        encoder memory of one chunk: what open_clip's `accum_freq` and GradCache give,
        and every other objective of the step sees the whole batch too."""
        encoder = self.encoder(modality)
        size = self.micro_batch_size
        if size is None or len(x) <= size:
            return encoder.encode(modality, x, mask, keep)
        contexts = partial(checkpoint_contexts, encoder)
        chunks = []
        for start in range(0, len(x), size):
            part = [t if t is None else t[start : start + size] for t in (x, mask, keep)]
            if torch.is_grad_enabled():
                chunk = checkpoint(
                    encoder.encode, modality, *part, use_reentrant=False, context_fn=contexts
                )
            else:
                chunk = encoder.encode(modality, *part)
            chunks.append(chunk)
        return torch.cat(chunks)

    def pool(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.encoder(modality).pool(modality, tokens, mask)

    def project(self, modality: str, pooled: Tensor) -> Tensor:
        """Projected, L2-normalised embedding in the shared space."""
        return F.normalize(self.projections[modality](pooled), dim=-1)

    def embed(self, modality: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.project(modality, self.pool(modality, self.encode(modality, x, mask), mask))

    # -- contrastive temperature ---------------------------------------------------------
    def contrastive_scale(self) -> tuple[Tensor, Tensor | None]:
        """(scale, bias or None) of the learned temperature (CLIP; SigLIP adds the bias)."""
        return self.part("logit_scale").exp(), self.logit_bias

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Clamp the log-scale to [0, ln(logit_scale.max)], as CLIP and open_clip do."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0.0, self.max_log_scale)

    def classify(self, embedding: Tensor) -> Tensor:
        """Class logits [B, C] of normalised embeddings: the classifier head at the
        contrastive temperature. Rows set to a zero-shot classifier (class prompt
        embeddings) and a zero bias give exactly zero-shot classification: WiSE-FT's
        start."""
        scale, _ = self.contrastive_scale()
        return self.part("classifier")(scale * embedding)

    # -- multimodal ----------------------------------------------------------------------
    def fuse(self, text_tokens: Tensor, text_mask: Tensor, memory: Tensor) -> Tensor:
        """Text tokens that cross-attend to memory tokens (ALBEF fusion); [CLS] is token 0."""
        return self.part("fusion")(text_tokens, text_mask, memory)

    def match_logits(self, text_tokens: Tensor, text_mask: Tensor, memory: Tensor) -> Tensor:
        """Image-text matching logits [N, 2] (unmatched, matched) of aligned rows."""
        return self.part("itm_head")(self.fuse(text_tokens, text_mask, memory)[:, 0])

    def masked_token_logits(self, text_tokens: Tensor, text_mask: Tensor, memory: Tensor):
        """Vocabulary logits [N, L, V] of (masked) text tokens fused with memory tokens."""
        return self.part("mlm_head")(self.fuse(text_tokens, text_mask, memory))

    def reconstruct(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Pixels of every patch from the tokens of the kept patches (MAE)."""
        return self.part("mim_decoder")(tokens, keep)

    def decode(
        self, ids: Tensor, memory: Tensor | None, text_mask: Tensor | None = None, cache=None
    ) -> Tensor:
        """Next-token logits of the caption decoder conditioned on `memory` tokens (None:
        on nothing, the decoder as a language model of text)."""
        return self.part("decoder")(ids, memory, text_mask=text_mask, cache=cache)

    @torch.no_grad()
    def generate(self, memory: Tensor | None, **kwargs) -> tuple[Tensor, Tensor]:
        """Token ids and log-probabilities of captions of `memory` tokens, or continuations
        of `prefix` ids (see models.generation for the strategies)."""
        return generate(self.part("decoder"), memory, **kwargs)
