"""polymodal-convert: open_clip checkpoints into polymodal, polymodal CLIPs out, and
WiSE-FT weight interpolation of a fine-tuning run.

    polymodal-convert from-open-clip ViT-B-32.json open_clip_model.safetensors vitb32.ckpt
    polymodal-convert to-open-clip logs/train/runs/<time>/checkpoints/last.ckpt exported/
    polymodal-convert wise-ft <run>/zeroshot.ckpt <run>/checkpoints/last.ckpt wise.ckpt --alpha 0.5

`from-open-clip` reads an open_clip model config (`<name>.json` of open_clip's
model_configs, or an `open_clip_config.json` holding `model_cfg`) and its weights
(safetensors, or a torch state dict read weights-only), and writes a checkpoint that
`polymodal.load`, `polymodal-eval` and `polymodal-embed` open like one of
`polymodal-train`'s, with open_clip's tokenizer (its BPE merges file, from the installed
open_clip package unless `--bpe` names one) and its bicubic resizing. `to-open-clip`
writes `<name>.json` and `open_clip_model.safetensors`, which open_clip loads with
`open_clip.add_model_config(dir / "<name>.json")` and
`open_clip.create_model_and_transforms("<name>", pretrained=dir / "open_clip_model.safetensors")`.
`wise-ft` writes (1 - alpha) x the zero-shot start + alpha x the fine-tuned weights
(WiSE-FT, Wortsman et al. 2022) of a task=classify run, a checkpoint `polymodal-eval` opens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save

from polymodal.data.tokenizer import (
    CLIP_SPECIAL_TOKENS,
    CLIP_VOCAB_SIZE,
    TextTokenizer,
    clip_bpe_tokenizer,
)
from polymodal.open_clip_format import (
    check_open_clip_config,
    check_preprocess,
    from_open_clip,
    open_clip_config,
    polymodal_overrides,
    to_open_clip,
)
from polymodal.tasks.pretrain import build_module
from polymodal.utils import cli, resolvers
from polymodal.utils.checkpoint import read_checkpoint, read_weights
from polymodal.utils.errors import ConfigError
from polymodal.utils.files import atomic_file, atomic_write_text


def open_clip_bpe() -> Path:
    """The BPE merges file of the installed open_clip package (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "--bpe: open_clip is not installed; name its bpe_simple_vocab_16e6.txt.gz"
        )
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def read_open_clip_config(path: Path) -> dict:
    """The model config of an open_clip `<name>.json` or `open_clip_config.json` (whose
    preprocessing must be the one polymodal reproduces), or a one-line ConfigError."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not an open_clip model config ({err})") from None
    if isinstance(cfg, dict) and "model_cfg" in cfg:
        check_preprocess(cfg.get("preprocess_cfg") or {}, str(path))
        cfg = cfg["model_cfg"]
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ConfigError(
            f"{path}: not an open_clip model config (embed_dim, vision_cfg, text_cfg)"
        )
    check_open_clip_config(cfg, str(path))
    return cfg


def from_open_clip_files(config: Path, weights: Path, out: Path, bpe: Path | None = None) -> str:
    """Write a polymodal checkpoint of an open_clip model (config + weights files) and its
    tokenizer (`<out>.tokenizer.json`); returns the `polymodal-train` command that
    trains from it (the same architecture and tokenizer)."""
    model_cfg = read_open_clip_config(config)
    state = read_weights(weights, lambda key: True)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # open_clip's DDP saves
    resolvers.register()
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["paths.root_dir=.", "paths.output_dir=.", *polymodal_overrides(model_cfg)],
        )
    module = build_module(cfg)
    converted = from_open_clip(state, str(weights))
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise ConfigError(
            f"{weights}: does not match {config} (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    try:
        module.load_state_dict(converted)
    except RuntimeError as err:  # a shape that differs from the config's
        raise ConfigError(f"{weights}: does not match {config}: {cli.one_line(str(err))}") from None
    tokenizer = clip_bpe_tokenizer(bpe or open_clip_bpe())
    state_of_tokenizer = {
        "json": tokenizer.to_str(),
        "context_length": cfg.data.context_length,
        "special_tokens": CLIP_SPECIAL_TOKENS,
        "source": f"open_clip BPE ({bpe or 'bpe_simple_vocab_16e6.txt.gz'})",
    }
    TextTokenizer.from_state(state_of_tokenizer)  # the roles resolve
    checkpoint = {
        "state_dict": module.state_dict(),
        "polymodal": {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "tokenizer": state_of_tokenizer,
        },
        "converted_from": {"open_clip_config": str(config), "weights": str(weights)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as file:
        torch.save(checkpoint, file)
    tokenizer_file = out.with_suffix(".tokenizer.json")
    atomic_write_text(tokenizer_file, tokenizer.to_str())
    overrides = [f"init_from={out}", f"data.tokenizer={tokenizer_file}"]
    return shlex.join(["polymodal-train", *overrides, *polymodal_overrides(model_cfg)])


def to_open_clip_files(ckpt: Path, out_dir: Path, name: str = "polymodal-clip") -> Path:
    """Write `<name>.json` and `open_clip_model.safetensors` of a polymodal CLIP."""
    if not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
        raise ConfigError(f"--name {name!r}: a model name (letters, digits, '_', '-', '.')")
    checkpoint = read_checkpoint(ckpt)
    stored = checkpoint.get("polymodal")
    if not isinstance(stored, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{ckpt}: not a polymodal checkpoint (no 'polymodal' entry)")
    config = stored["config"]
    tokens = stored["tokenizer"].get("special_tokens") or {}
    tokenizer = TextTokenizer.from_state(stored["tokenizer"])
    if tokenizer.vocab_size != CLIP_VOCAB_SIZE or tokens.get("bos") != CLIP_SPECIAL_TOKENS["bos"]:
        raise ConfigError(
            f"{ckpt}: its tokenizer is not open_clip's BPE, so open_clip would feed the text "
            "tower other ids (train from a model made by `polymodal-convert from-open-clip`)"
        )
    model_cfg = open_clip_config(config["model"], config["data"])
    state = to_open_clip(checkpoint["state_dict"], str(ckpt))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps(model_cfg, indent=2) + "\n")
    weights = out_dir / "open_clip_model.safetensors"
    with atomic_file(weights) as file:
        file.write(save({k: v.contiguous() for k, v in state.items()}))
    return weights


def polymodal_checkpoint(path: Path) -> dict:
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict")
    if not isinstance(checkpoint.get("polymodal"), dict) or not isinstance(state, dict):
        raise ConfigError(f"{path}: not a polymodal checkpoint (no 'polymodal' entry)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{path}: its state_dict is not names -> tensors")
    return checkpoint


def wise_ft_files(zeroshot: Path, finetuned: Path, out: Path, alpha: float) -> Path:
    """WiSE-FT: `out` holds (1 - alpha) * zeroshot + alpha * finetuned of every floating
    tensor (integer buffers, e.g. BatchNorm's batch count, from the fine-tuned run) with
    the fine-tuned checkpoint's config, tokenizer and classes. The two must be the ends of
    one fine-tuning run: the same tensors, shapes and dtypes."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha: a weight in [0, 1] (0: the zero-shot start), got {alpha}")
    begin, end = polymodal_checkpoint(zeroshot), polymodal_checkpoint(finetuned)
    start, tuned = begin["state_dict"], end["state_dict"]
    differ = sorted(set(start) ^ set(tuned)) or [
        k for k in tuned if (start[k].shape, start[k].dtype) != (tuned[k].shape, tuned[k].dtype)
    ]
    if differ:
        raise ConfigError(
            f"{zeroshot} and {finetuned}: different tensors (e.g. {differ[0]}); WiSE-FT mixes "
            "the two ends of one fine-tuning run (its zeroshot.ckpt and a checkpoint)"
        )
    heads = [c["polymodal"].get("classifier") for c in (begin, end)]
    if heads[0] != heads[1]:
        raise ConfigError(
            f"{zeroshot} and {finetuned}: classifier heads of other labels ({heads[0]} vs "
            f"{heads[1]}); WiSE-FT mixes the two ends of one fine-tuning run"
        )
    mixed = {
        k: (1 - alpha) * start[k] + alpha * v if v.is_floating_point() else v
        for k, v in tuned.items()
    }
    checkpoint = {
        "state_dict": mixed,
        "polymodal": end["polymodal"],
        "wise_ft": {"alpha": alpha, "zeroshot": str(zeroshot), "finetuned": str(finetuned)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as file:
        torch.save(checkpoint, file)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polymodal-convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser(
        "from-open-clip", help="an open_clip model -> a polymodal checkpoint"
    )
    load.add_argument("config", type=Path, help="open_clip model config (.json)")
    load.add_argument("weights", type=Path, help="its weights (.safetensors, .bin, .pt)")
    load.add_argument("out", type=Path, help="the polymodal checkpoint to write (.ckpt)")
    load.add_argument("--bpe", type=Path, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    save = commands.add_parser("to-open-clip", help="a polymodal CLIP -> open_clip files")
    save.add_argument("ckpt", type=Path, help="a polymodal checkpoint")
    save.add_argument("out_dir", type=Path, help="where <name>.json and the weights go")
    save.add_argument("--name", default="polymodal-clip", help="the open_clip model name")
    wise = commands.add_parser("wise-ft", help="interpolate a fine-tuning run's weights")
    wise.add_argument("zeroshot", type=Path, help="the run's start (<run dir>/zeroshot.ckpt)")
    wise.add_argument("finetuned", type=Path, help="its fine-tuned checkpoint")
    wise.add_argument("out", type=Path, help="the checkpoint to write (.ckpt)")
    wise.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned end")
    args = parser.parse_args(argv)
    try:
        if args.command == "from-open-clip":
            command = from_open_clip_files(args.config, args.weights, args.out, args.bpe)
            print(f"wrote {args.out}\ntrain from it:\n{command}")
        elif args.command == "wise-ft":
            print(f"wrote {wise_ft_files(args.zeroshot, args.finetuned, args.out, args.alpha)}")
        else:
            print(f"wrote {to_open_clip_files(args.ckpt, args.out_dir, args.name)}")
    except Exception as err:
        if cli.report(err):  # one line for a user error (utils/cli.py); a bug keeps its traceback
            return 1
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
