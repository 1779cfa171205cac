"""`polymodal-eval`: run a list of benchmarks on a checkpoint, write eval_metrics.json.

    polymodal-eval ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt eval=shapes

Each entry of `eval.benchmarks` names a `kind`:
- `zeroshot_retrieval`: zero-shot top-1/top-5/mean per-class accuracy per labelled
  attribute (`templates`, class names from `classes` or the `manifest`; confusion
  matrices to `confusion/<name>_<attribute>.json`), and image<->text retrieval, on `shards`;
- `linear_probe`: logistic regression on frozen image embeddings of `train_shards`,
  top-1 accuracy on `test_shards`, for each attribute in `labels`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import polymodal
from polymodal.api import Polymodal
from polymodal.evaluation.evaluator import EmbeddingEvaluator
from polymodal.evaluation.linear_probe import linear_probe
from polymodal.train import CONFIG_DIR
from polymodal.utils.errors import ConfigError
from polymodal.utils.report import print_metrics, write_metrics


def zeroshot_retrieval(
    model: Polymodal, spec: Mapping, batch_size: int, out_dir: Path, name: str
) -> dict[str, float]:
    """Zero-shot + retrieval metrics; each attribute's confusion matrix goes to
    `<out_dir>/confusion/<name>_<attribute>.json`."""
    data = model.embed_shards(spec["shards"], batch_size)
    evaluator = EmbeddingEvaluator(
        templates=spec.get("templates"),
        classes=spec.get("classes"),
        phrases=spec.get("phrases"),
        manifest=spec.get("manifest"),
        retrieval=spec.get("retrieval", True),
    )
    evaluator.update(data["image"], data["text"], data["meta"])
    metrics = evaluator.compute(model.encode_text)
    (out_dir / "confusion").mkdir(parents=True, exist_ok=True)
    for attribute, matrix in evaluator.confusion.items():
        table = {"classes": evaluator.classes(attribute), "matrix": matrix.tolist()}
        (out_dir / "confusion" / f"{name}_{attribute}.json").write_text(json.dumps(table))
    metrics["samples"] = float(len(data["keys"]))
    metrics["skipped_samples"] = float(len(data["skipped"]))
    return metrics


def probe(
    model: Polymodal, spec: Mapping, batch_size: int, out_dir: Path, name: str
) -> dict[str, float]:
    train = model.embed_shards(spec["train_shards"], batch_size)
    test = model.embed_shards(spec["test_shards"], batch_size)
    names = EmbeddingEvaluator(classes=spec.get("classes"), manifest=spec.get("manifest"))
    metrics = {}
    for attribute in spec["labels"]:
        index = {name: i for i, name in enumerate(names.classes(attribute))}

        def labels(metas: list[dict], attribute: str = attribute, index: dict = index):
            return torch.tensor([index.get(m.get(attribute), -1) for m in metas])

        result = linear_probe(
            train["image"], labels(train["meta"]), test["image"], labels(test["meta"])
        )
        metrics[f"{attribute}_acc"] = result["acc"]
    return metrics


BENCHMARKS = {"zeroshot_retrieval": zeroshot_retrieval, "linear_probe": probe}


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """Every benchmark of `cfg.eval.benchmarks` on `cfg.ckpt_path`; flat `<name>/<metric>`."""
    model = polymodal.load(cfg.ckpt_path, device=cfg.device)
    metrics: dict[str, float] = {}
    for name, spec in OmegaConf.to_container(cfg.eval.benchmarks, resolve=True).items():
        kind = spec.get("kind")
        if kind not in BENCHMARKS:
            raise ConfigError(
                f"eval.benchmarks.{name}.kind: {kind!r} is not one of {sorted(BENCHMARKS)}"
            )
        result = BENCHMARKS[kind](model, spec, cfg.batch_size, out_dir, name)
        metrics.update({f"{name}/{key}": float(value) for key, value in result.items()})
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.paths.output_dir)
    try:
        metrics = evaluate(cfg, out_dir)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    write_metrics(metrics, out_dir, "eval_metrics.json")
    print_metrics(metrics, out_dir, title="evaluation")


if __name__ == "__main__":
    main()
