"""`polymodal-embed`: image (or audio) and text embeddings of a shard set, for downstream
use.

    polymodal-embed ckpt_path=runs/.../last.ckpt shards='data/val/*.tar' out_dir=emb/

Writes `image_embeddings.npy` (`audio_embeddings.npy` for an audio checkpoint, e.g.
experiment=clap_sounds), `text_embeddings.npy` (float32 [N, D], L2-normalised),
`keys.txt` and `meta.jsonl`, all in the same sample order. `keys.txt` holds one sample
key per line as a JSON string (ASCII; quotes, backslashes, newlines and non-ASCII
characters escaped), since a key is a tar member name and may hold any of them:
    keys = [json.loads(line) for line in open("keys.txt")]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

import polymodal
from polymodal.utils.cli import hydra_app
from polymodal.utils.validate import check_types


def embed(cfg: DictConfig) -> dict:
    """Embed `cfg.shards` with the checkpoint `cfg.ckpt_path`; returns a summary."""
    model = polymodal.load(cfg.ckpt_path, device=cfg.device)
    if cfg.get("modality"):
        model.modality = cfg.modality
    result = model.embed_shards(cfg.shards, batch_size=cfg.batch_size)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{model.modality}_embeddings.npy", result[model.modality].float().numpy())
    np.save(out / "text_embeddings.npy", result["text"].float().numpy())
    (out / "keys.txt").write_text("".join(json.dumps(key) + "\n" for key in result["keys"]))
    with open(out / "meta.jsonl", "w") as f:
        f.writelines(json.dumps(meta, sort_keys=True) + "\n" for meta in result["meta"])
    return {
        "samples": len(result["keys"]),
        "dim": result["text"].shape[1],
        "skipped": len(result["skipped"]),
        "out_dir": str(out),
    }


@hydra_app("embed")
def main(cfg: DictConfig) -> None:
    check_types(cfg)
    summary = embed(cfg)
    print(
        f"embedded {summary['samples']} samples (dim {summary['dim']}, "
        f"{summary['skipped']} skipped) -> {summary['out_dir']}"
    )


if __name__ == "__main__":
    main()
