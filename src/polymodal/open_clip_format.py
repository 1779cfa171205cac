"""open_clip's CLIP format <-> polymodal's: model configs and state-dict keys.

open_clip's ViT CLIP (`open_clip.model.CLIP` with its `VisionTransformer` and text
Transformer) is, block for block, polymodal's `sharing=separate` model with timm's CLIP
flavour of ViT as the image tower (pre-norm, no patch-embedding bias, LayerNorm eps 1e-5,
class-token pooling) and our causal text tower pooled at EOS (open_clip pools at the
highest token id, its end-of-text token): the same weights under other names, a few
transposed or reshaped. Nothing here imports open_clip; its files are read as data.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from polymodal.data.tokenizer import CLIP_VOCAB_SIZE
from polymodal.data.transforms import CLIP_MEAN, CLIP_STD
from polymodal.utils.errors import ConfigError

IMAGE = "model.encoders.image.model."
TEXT = "model.encoders.text."
# timm's CLIP flavour of ViT; embed_dim, depth, num_heads, patch and image size are set
TIMM_CLIP_VIT = "vit_base_patch16_clip_224"
HEAD_WIDTH = 64  # open_clip's ViT: width // 64 heads
# (open_clip prefix, polymodal prefix, the tower whose residual blocks follow or None)
PREFIXES = [
    ("visual.conv1.", IMAGE + "patch_embed.proj.", None),
    ("visual.class_embedding", IMAGE + "cls_token", None),
    ("visual.positional_embedding", IMAGE + "pos_embed", None),
    ("visual.ln_pre.", IMAGE + "norm_pre.", None),
    ("visual.transformer.resblocks.", IMAGE + "blocks.", "image"),
    ("visual.ln_post.", IMAGE + "norm.", None),
    ("visual.proj", "model.projections.image.weight", None),
    ("token_embedding.", TEXT + "stems.text.embed.token.", None),
    ("positional_embedding", TEXT + "stems.text.embed.position", None),
    ("transformer.resblocks.", TEXT + "blocks.", "text"),
    ("ln_final.", TEXT + "norms.text.", None),
    ("text_projection", "model.projections.text.weight", None),
    ("logit_scale", "model.logit_scale", None),
]
# inside a residual block: open_clip's names -> timm's (image) and ours (text)
BLOCK = {
    "image": [
        ("ln_1.", "norm1."),
        ("attn.in_proj_weight", "attn.qkv.weight"),
        ("attn.in_proj_bias", "attn.qkv.bias"),
        ("attn.out_proj.", "attn.proj."),
        ("ln_2.", "norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ],
    "text": [
        ("ln_1.", "norm1."),
        ("attn.in_proj_weight", "attn.qkv.weight"),
        ("attn.in_proj_bias", "attn.qkv.bias"),
        ("attn.out_proj.", "attn.proj."),
        ("ln_2.", "norm2."),
        ("mlp.c_fc.", "mlp.0."),
        ("mlp.c_proj.", "mlp.2."),
    ],
}
# open_clip tensors stored in another shape: (to polymodal's, back to open_clip's)
RESHAPED = {
    "visual.proj": (Tensor.t, Tensor.t),  # [W, E] <-> Linear's [E, W]
    "text_projection": (Tensor.t, Tensor.t),
    "visual.class_embedding": (lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1)),
    "visual.positional_embedding": (lambda t: t.unsqueeze(0), lambda t: t[0]),
    "logit_scale": (lambda t: t.reshape(1), lambda t: t.reshape(())),  # FSDP needs [1]
}
# open_clip config keys (model_cfg, vision_cfg, text_cfg) and the only values this
# conversion reproduces; any other key is refused by name
SUPPORTED = {
    "model": {"quick_gelu": False, "cast_dtype": None, "custom_text": False},
    "vision": {
        "head_width": HEAD_WIDTH,
        "ls_init_value": None,
        "attentional_pool": False,
        "no_ln_pre": False,
        "pos_embed_type": "learnable",
        "final_ln_after_pool": False,
        "pool_type": "tok",
        "output_tokens": False,
        "act_kwargs": None,
        "norm_kwargs": None,
        "timm_model_name": None,
        "patch_dropout": 0.0,
    },
    "text": {
        "hf_model_name": None,
        "ls_init_value": None,
        "embed_cls": False,
        "pad_id": 0,
        "no_causal_mask": False,
        "final_ln_after_pool": False,
        "pool_type": "argmax",
        "proj_bias": False,
        "proj_type": "linear",
        "output_tokens": False,
        "act_kwargs": None,
        "norm_kwargs": None,
    },
}
SIZES = {
    "model": {"embed_dim"},
    "vision": {"layers", "width", "patch_size", "image_size", "mlp_ratio"},
    "text": {"layers", "width", "heads", "context_length", "vocab_size", "mlp_ratio"},
}


def check_open_clip_config(cfg: Mapping, source: str) -> None:
    """Raise a ConfigError naming the first key of an open_clip model config (`embed_dim`,
    `vision_cfg`, `text_cfg`) this conversion cannot reproduce."""
    parts = {
        "model": ({k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg")}, ""),
        "vision": (cfg.get("vision_cfg") or {}, "vision_cfg."),
        "text": (cfg.get("text_cfg") or {}, "text_cfg."),
    }
    for part, (values, prefix) in parts.items():
        for key, value in values.items():
            if key in SIZES[part]:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ConfigError(
                        f"{source}: {prefix}{key}={value!r} is not supported: polymodal reads "
                        "open_clip's ViT CLIP (a number here), not a ResNet tower"
                    )
                continue
            if key not in SUPPORTED[part] or value != SUPPORTED[part][key]:
                allowed = f" (only {SUPPORTED[part][key]!r})" if key in SUPPORTED[part] else ""
                raise ConfigError(
                    f"{source}: {prefix}{key}={value!r} is not supported{allowed}: polymodal "
                    "reads open_clip's ViT CLIP with GELU, class-token and argmax pooling"
                )


def check_preprocess(cfg: Mapping, source: str) -> None:
    """Refuse an open_clip `preprocess_cfg` other than the one polymodal's eval transform
    reproduces (CLIP's mean and std, bicubic resize of the shortest side, centre crop)."""
    wanted = {
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    for key, value in cfg.items():
        if (
            key in wanted
            and (list(value) if isinstance(value, list | tuple) else value) != wanted[key]
        ):
            raise ConfigError(
                f"{source}: preprocess_cfg.{key}={value!r} is not supported (only {wanted[key]!r})"
            )


def polymodal_overrides(cfg: Mapping) -> list[str]:
    """Hydra overrides of `polymodal-train`'s config that build the polymodal model of
    an open_clip model config (sizes as open_clip's defaults fill them in)."""
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    width, image_size = vision["width"], vision.get("image_size", 224)  # open_clip's defaults
    return [
        f"model.embed_dim={cfg['embed_dim']}",
        f"model.vocab_size={text.get('vocab_size', CLIP_VOCAB_SIZE)}",
        "model.stems.image.conv_stem=false",
        f"model.stems.image.patch_size={vision['patch_size']}",
        f"model.towers.image.timm={TIMM_CLIP_VIT}",
        f"model.towers.image.embed_dim={width}",
        f"model.towers.image.depth={vision['layers']}",
        f"model.towers.image.num_heads={width // HEAD_WIDTH}",
        f"+model.towers.image.mlp_ratio={vision.get('mlp_ratio', 4.0)}",
        f"model.towers.text.width={text.get('width', 512)}",
        f"model.towers.text.depth={text.get('layers', 12)}",
        f"model.towers.text.num_heads={text.get('heads', 8)}",
        f"+model.towers.text.mlp_ratio={text.get('mlp_ratio', 4.0)}",
        "model/text=causal",
        f"data.image_size={image_size}",
        f"data.context_length={text.get('context_length', 77)}",
        "data.interpolation=bicubic",  # open_clip's Resize
    ]


TEXT_STEM = "polymodal.models.text.TextStem"  # our text Transformer (not an HF tower)


def open_clip_config(model: Mapping, data: Mapping) -> dict:
    """The open_clip model config (`<name>.json` for `open_clip.add_model_config`) of a
    polymodal run config, or a ConfigError naming what open_clip's CLIP cannot hold."""
    towers, stems = model["towers"], model["stems"]
    image, text = towers["image"], towers["text"]
    checks = {
        "model.sharing": (model["sharing"], "separate"),
        "model.modalities": (list(model["modalities"]), ["image", "text"]),
        "model.towers.image.timm": (image["timm"], TIMM_CLIP_VIT),
        "model.stems.image.conv_stem": (stems["image"]["conv_stem"], False),
        "model.stems.text._target_": (stems["text"].get("_target_"), TEXT_STEM),
        "model.stems.text.causal": (stems["text"].get("causal"), True),
        "model.stems.text.pool": (stems["text"]["pool"], "eos"),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ConfigError(f"{key}={value!r}: open_clip's CLIP needs {wanted!r}")
    if image["embed_dim"] != HEAD_WIDTH * image["num_heads"]:
        raise ConfigError(
            f"model.towers.image: open_clip's ViT has heads of width {HEAD_WIDTH} "
            f"(embed_dim {image['embed_dim']}, num_heads {image['num_heads']})"
        )
    return {
        "embed_dim": model["embed_dim"],
        "vision_cfg": {
            "image_size": data["image_size"],
            "layers": image["depth"],
            "width": image["embed_dim"],
            "patch_size": stems["image"]["patch_size"],
            "mlp_ratio": image.get("mlp_ratio", 4.0),
        },
        "text_cfg": {
            "context_length": data["context_length"],
            "vocab_size": model["vocab_size"],
            "width": text["width"],
            "heads": text["num_heads"],
            "layers": text["depth"],
            "mlp_ratio": text.get("mlp_ratio", 4.0),
        },
    }


def _rename(key: str, to_polymodal: bool, source: str) -> str:
    """`key` in the other format, or a ConfigError naming it."""
    for open_clip, polymodal, tower in PREFIXES:
        old, new = (open_clip, polymodal) if to_polymodal else (polymodal, open_clip)
        if not key.startswith(old):
            continue
        rest = key[len(old) :]
        if tower is None:
            return new + rest
        index, _, inner = rest.partition(".")
        for a, b in BLOCK[tower]:
            inside_old, inside_new = (a, b) if to_polymodal else (b, a)
            if inner.startswith(inside_old):
                return f"{new}{index}.{inside_new}{inner[len(inside_old) :]}"
    raise ConfigError(f"{source}: {key!r} has no counterpart in open_clip's ViT CLIP")


def from_open_clip(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """A polymodal PretrainModule state dict from an open_clip CLIP state dict."""
    out = {}
    for key, value in state.items():
        if key in RESHAPED:
            value = RESHAPED[key][0](value)
        out[_rename(key, True, source)] = value.contiguous()
    return out


def to_open_clip(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """An open_clip CLIP state dict from a polymodal PretrainModule state dict."""
    out = {}
    for key, value in state.items():
        old = _rename(key, False, source)
        if old in RESHAPED:
            value = RESHAPED[old][1](value)
        out[old] = value.contiguous()
    return out
