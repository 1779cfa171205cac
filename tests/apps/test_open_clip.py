"""open_clip interop against open_clip itself (3.3.0, the dev extra): its tokenizer's ids,
and a random-init ViT-B-32 through `polymodal-convert` both ways, compared by
embeddings on open_clip's own preprocessing and by every weight."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import polymodal
from polymodal.convert import from_open_clip_files, to_open_clip_files
from polymodal.data.tokenizer import CLIP_SPECIAL_TOKENS, TextTokenizer, clip_bpe_tokenizer
from polymodal.open_clip_format import open_clip_config
from polymodal.utils.errors import ConfigError
from tests.apps.test_api import run_eval_app
from tests.helpers import compose_train, train_tiny

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a red circle on the left",
    "Two  BIG blue squares!!",
    "It's 42 o'clock, isn't it?",
    "café naïve résumé",
    "a photo of a 🐶 dog",
    "tab\tand\nnewline, hello-world foo_bar 3.14",
    "it’s a “dog” &amp; ﬁne ＣＡＴＳ",  # ftfy's and html's cleaning first, as open_clip
    "word " * 100,  # truncated at 77 tokens, ending with end-of-text
]


def convert(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polymodal.convert", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )


def test_clip_bpe_gives_open_clips_ids():
    from open_clip.tokenizer import default_bpe

    state = {
        "json": clip_bpe_tokenizer(default_bpe()).to_str(),
        "context_length": 77,
        "special_tokens": CLIP_SPECIAL_TOKENS,
    }
    ids, mask = TextTokenizer.from_state(state).encode(TEXTS)
    expected = open_clip.tokenize(TEXTS)  # padded with 0 after end-of-text
    for row in range(len(TEXTS)):
        assert ids[row][mask[row]].tolist() == expected[row][expected[row] != 0].tolist()
    with pytest.raises(ConfigError, match="not a CLIP BPE merges file"):
        clip_bpe_tokenizer(Path(__file__))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (300, 200), (224, 224), (97, 333)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def embeddings(model, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in images()])
        image = model.encode_image(pixels, normalize=True)
        return image, model.encode_text(open_clip.tokenize(TEXTS), normalize=True)


@pytest.mark.slow  # ~2-3 min: a ViT-B/32 built four times, a CLI conversion each way, an eval
def test_vit_b32_round_trip(tmp_path, shapes_dir):
    """open_clip -> polymodal: image and text embeddings through polymodal's own
    preprocessing and tokenizer equal open_clip's through its own (atol 1e-4); a
    zero-shot eval runs on it. polymodal -> open_clip: `create_model_and_transforms`
    loads the export, and every tensor equals the original's."""
    torch.manual_seed(0)
    original, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    original.eval()
    save_file(original.state_dict(), tmp_path / "vitb32.safetensors")
    (tmp_path / "ViT-B-32.json").write_text(json.dumps(open_clip.get_model_config("ViT-B-32")))
    out = convert(
        "from-open-clip", "ViT-B-32.json", "vitb32.safetensors", "vitb32.ckpt", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    image, text = embeddings(original, preprocess)

    model = polymodal.load(tmp_path / "vitb32.ckpt")
    torch.testing.assert_close(model.encode_image(images()), image, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.encode_text(TEXTS), text, atol=1e-4, rtol=0)

    run = run_eval_app(
        tmp_path / "vitb32.ckpt",
        shapes_dir,
        tmp_path / "eval",
        "~eval.benchmarks.test",
        "~eval.benchmarks.linear_probe",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert metrics["val/samples"] == 128 and "val/zeroshot/mean_acc" in metrics

    out = convert("to-open-clip", "vitb32.ckpt", "exported", "--name", "pm-b32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    open_clip.add_model_config(tmp_path / "exported" / "pm-b32.json")
    weights = tmp_path / "exported" / "open_clip_model.safetensors"
    back, _, back_preprocess = open_clip.create_model_and_transforms(
        "pm-b32", pretrained=str(weights)
    )
    back.eval()
    state = original.state_dict()
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())
    for got, want in zip(embeddings(back, back_preprocess), (image, text), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_what_open_clip_cannot_hold_is_refused(tmp_path, shapes_dir):
    """Our shapes CLIP (conv stem, its own tokenizer) does not export; an open_clip
    config with QuickGELU or open_clip weights of another size do not import: one line
    each, naming why."""
    ckpt, _ = train_tiny(tmp_path / "run", shapes_dir)
    with pytest.raises(ConfigError, match="its tokenizer is not open_clip's BPE"):
        to_open_clip_files(ckpt, tmp_path / "exported")
    config = open_clip.get_model_config("ViT-B-32")
    (tmp_path / "quick.json").write_text(json.dumps({**config, "quick_gelu": True}))
    with pytest.raises(ConfigError, match="quick.json: quick_gelu=True is not supported"):
        from_open_clip_files(tmp_path / "quick.json", tmp_path / "none.pt", tmp_path / "x.ckpt")
    resnet = {**config, "vision_cfg": {**config["vision_cfg"], "layers": [3, 4, 6, 3]}}
    (tmp_path / "rn.json").write_text(json.dumps(resnet))
    with pytest.raises(
        ConfigError, match=r"rn.json: vision_cfg.layers=\[3, 4, 6, 3\] is not supported"
    ):
        from_open_clip_files(tmp_path / "rn.json", tmp_path / "none.pt", tmp_path / "x.ckpt")
    hub = {"model_cfg": config, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    with pytest.raises(
        ConfigError, match=r"preprocess_cfg.mean=\[0.5, 0.5, 0.5\] is not supported"
    ):
        from_open_clip_files(
            tmp_path / "open_clip_config.json", tmp_path / "none.pt", tmp_path / "x.ckpt"
        )
    with pytest.raises(ConfigError, match="--name '../up': a model name"):
        to_open_clip_files(ckpt, tmp_path / "exported", "../up")
    small = {**config, "vision_cfg": {**config["vision_cfg"], "layers": 1}}
    small["text_cfg"] = {**config["text_cfg"], "layers": 1}
    (tmp_path / "small.json").write_text(json.dumps(small))
    torch.manual_seed(0)
    save_file(open_clip.create_model("ViT-B-32").state_dict(), tmp_path / "b32.safetensors")
    with pytest.raises(ConfigError, match=r"b32.safetensors: does not match .*small.json"):
        from_open_clip_files(
            tmp_path / "small.json", tmp_path / "b32.safetensors", tmp_path / "x.ckpt"
        )


def test_import_fine_tune_export(tmp_path, shapes_dir):
    """The loop a researcher runs: a (small, random-init) open_clip model converted, then
    trained on shapes with the command the converter prints, then exported: open_clip
    loads the result and embeds as polymodal does."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (tmp_path / "oc-small.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "oc-small.json")
    torch.manual_seed(0)
    save_file(open_clip.create_model("oc-small").state_dict(), tmp_path / "small.safetensors")
    out = convert(
        "from-open-clip", "oc-small.json", "small.safetensors", "small.ckpt", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    command = shlex.split(out.stdout.strip().splitlines()[-1])
    assert command[0] == "polymodal-train"
    resolved = [arg.replace("=small.", f"={tmp_path}/small.") for arg in command[1:]]
    trained, _ = train_tiny(tmp_path / "run", shapes_dir, *resolved, steps=2)
    start = polymodal.load(tmp_path / "small.ckpt").module.state_dict()
    end = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
    assert start.keys() == end.keys()  # trained from the converted weights: 2 small steps
    assert all(torch.allclose(end[k], v, atol=0.01) for k, v in start.items())
    assert not torch.equal(
        end["model.projections.image.weight"], start["model.projections.image.weight"]
    )

    to_open_clip_files(trained, tmp_path / "exported", "oc-tuned")
    open_clip.add_model_config(tmp_path / "exported" / "oc-tuned.json")
    weights = str(tmp_path / "exported" / "open_clip_model.safetensors")
    tuned, _, preprocess = open_clip.create_model_and_transforms("oc-tuned", pretrained=weights)
    image, text = embeddings(tuned.eval(), preprocess)
    model = polymodal.load(trained)
    torch.testing.assert_close(model.encode_image(images()), image, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.encode_text(TEXTS), text, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("preset", "name"), [("base", "ViT-B-16"), ("small", "ViT-S-16")])
def test_size_presets_are_open_clips_architectures(tmp_path, preset, name):
    """model=base / small at 224 px with open_clip's tokenizer sizes export to exactly
    open_clip's ViT-B-16 / ViT-S-16 model configs (the same shapes, block for block)."""
    overrides = [f"model={preset}", "data.image_size=224", "data.context_length=77"]
    cfg = compose_train([*overrides, "model.vocab_size=49408"], tmp_path, tmp_path)
    exported = open_clip_config(cfg.model, cfg.data)
    reference = open_clip.get_model_config(name)
    assert {k: v for k, v in exported["vision_cfg"].items() if k != "mlp_ratio"} == reference[
        "vision_cfg"
    ]
    assert {k: v for k, v in exported["text_cfg"].items() if k != "mlp_ratio"} == reference[
        "text_cfg"
    ]
    assert exported["embed_dim"] == reference["embed_dim"]
