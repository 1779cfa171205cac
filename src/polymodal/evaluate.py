"""`polymodal-eval`: run a list of benchmarks on a checkpoint, write eval_metrics.json.

    polymodal-eval ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt eval=shapes

Each entry of `eval.benchmarks` names a `kind`:
- `zeroshot_retrieval`: zero-shot top-1/top-5/mean per-class accuracy per attribute of
  `zeroshot` (`<attribute>: {classes, templates, phrases}`, as `data.zeroshot`; classes
  `values` are those in the json of `shards`; confusion
  matrices to `confusion/<name>_<attribute>.json` and `media/confusion_<attribute>_<name>.png`),
  and image<->text retrieval on `shards` (captions sharing a json `group_by` value, COCO's
  `image_id`, are one image; examples to `media/retrieval_<name>.{csv,png}`);
- `linear_probe`: logistic regression on frozen image embeddings of `train_shards`,
  top-1 accuracy on `test_shards`, for each json attribute in `labels` (classes: the
  values in the train split);
- `captioning` (checkpoints with a decoder): BLEU-4 and CIDEr of captions generated for
  the first `max_samples` images (or clips) of `shards` against all of each image's
  captions, with `wer: true` the word error rate against each sample's first text (a
  transcript: speech recognition); every generated caption to `captions/<name>.jsonl`;
- `classifier` (checkpoints fine-tuned with task=classify): top-1/top-5/mean per-class
  accuracy of the classifier head on `shards`, labelled by the json attribute it learnt.

Benchmarks read the checkpoint's modality (image or audio, `Polymodal.modality`; the
`modality` key picks one of a checkpoint of several): zero-shot, retrieval and probes of
an audio checkpoint score clips against texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

import polymodal
from polymodal.api import Polymodal
from polymodal.data.meta import IMAGE_ID, label_indices, label_name, sorted_labels
from polymodal.data.shardtools import values_reader
from polymodal.evaluation.captioning import caption_metrics, word_error_rate
from polymodal.evaluation.evaluator import EmbeddingEvaluator, image_of
from polymodal.evaluation.linear_probe import linear_probe
from polymodal.evaluation.validation import write_evaluation_media
from polymodal.evaluation.zeroshot import classification_metrics, zeroshot_tasks
from polymodal.utils.cli import hydra_app
from polymodal.utils.errors import ConfigError
from polymodal.utils.instantiate import instantiate_group
from polymodal.utils.loggers import finish_wandb, log_eval_files
from polymodal.utils.report import print_metrics, write_metrics
from polymodal.utils.validate import check_types


def zeroshot_retrieval(
    model: Polymodal, spec: Mapping, batch_size: int, out_dir: Path, name: str
) -> dict[str, float]:
    """Zero-shot + retrieval metrics; each attribute's confusion matrix goes to
    `<out_dir>/confusion/<name>_<attribute>.json`."""
    where = f"eval.benchmarks.{name}"
    values = values_reader(spec["shards"], f"{where}.shards")
    zeroshot = zeroshot_tasks(spec.get("zeroshot"), f"{where}.zeroshot", values)
    retrieval = spec.get("retrieval", True)
    examples = spec.get("media_samples", 8) if retrieval else 0
    data = model.embed_shards(spec["shards"], batch_size, keep_images=examples)
    evaluator = EmbeddingEvaluator(
        zeroshot,
        retrieval=retrieval,
        group_by=spec.get("group_by", IMAGE_ID),
    )
    evaluator.update(data[model.modality], data["text"], data["meta"], data["captions"])
    metrics = evaluator.compute(model.encode_text)
    (out_dir / "confusion").mkdir(parents=True, exist_ok=True)
    for attribute, matrix in evaluator.confusion.items():
        table = {"classes": evaluator.classes(attribute), "matrix": matrix.tolist()}
        (out_dir / "confusion" / f"{name}_{attribute}.json").write_text(json.dumps(table))
    rate = model.audio.sample_rate if model.audio else None
    media = out_dir / "media"
    keys, sounds = data["keys"], data["sounds"]
    write_evaluation_media(evaluator, data["images"], media, f"_{name}", keys, sounds, rate)
    metrics["samples"] = float(len(data["keys"]))
    metrics["skipped_samples"] = float(len(data["skipped"]))
    return metrics


def probe(
    model: Polymodal, spec: Mapping, batch_size: int, out_dir: Path, name: str
) -> dict[str, float]:
    train = model.embed_shards(spec["train_shards"], batch_size)
    test = model.embed_shards(spec["test_shards"], batch_size)
    modality = model.modality
    metrics = {}
    for attribute in spec["labels"]:
        # the classes are the train split's values (test values outside them are not scored)
        classes = sorted_labels(
            name for m in train["meta"] if (name := label_name(m.get(attribute))) is not None
        )
        result = linear_probe(
            train[modality],
            label_indices(train["meta"], attribute, classes),
            test[modality],
            label_indices(test["meta"], attribute, classes),
        )
        metrics[f"{attribute}_acc"] = result["acc"]
    return metrics


def captioning(
    model: Polymodal, spec: Mapping, batch_size: int, out_dir: Path, name: str
) -> dict[str, float]:
    """Captions for the first `max_samples` images; references are all captions of an
    image (samples sharing a `group_by` value), as COCO scores them."""
    if model.module.model.decoder is None:
        raise ConfigError(
            f"eval.benchmarks.{name}: kind captioning needs a checkpoint with a caption "
            "decoder (trained with a caption objective, e.g. experiment=coca)"
        )
    max_samples, group_by = spec.get("max_samples", 500), spec.get("group_by", IMAGE_ID)
    images, references, metas, keys, skipped = {}, {}, {}, {}, []
    for sample in model.read_shards(spec["shards"], skipped):
        image_id = image_of(sample["meta"], group_by, sample["key"])
        if image_id not in images and len(images) < max_samples:
            images[image_id], metas[image_id] = sample, sample["meta"]
            keys[image_id], references[image_id] = sample["key"], []
        if image_id in references:
            references[image_id].append(sample["text"])
    if not images:
        raise ValueError(
            f"eval.benchmarks.{name}.shards: no usable sample ({len(skipped)} skipped)"
        )
    ids = list(images)
    generated = {}
    given = "audio" if model.modality == "audio" else "images"
    for start in range(0, len(ids), batch_size):
        inputs = model.batch_input([images[i] for i in ids[start : start + batch_size]])
        texts = model.generate(**{given: inputs}, **spec.get("generation", {}))
        generated.update(zip(ids[start : start + batch_size], texts, strict=True))
    attributes = spec.get("match_attributes", ["color", "shape"])
    metrics = caption_metrics(generated, references, metas, attributes)
    if spec.get("wer", False):  # each sample's own text is its transcript
        own = [references[i][0] for i in ids]
        metrics["wer"] = word_error_rate([generated[i] for i in ids], own)
    (out_dir / "captions").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "captions" / f"{name}.jsonl", "w") as file:
        for i in ids:
            row = {"key": keys[i], "generated": generated[i], "references": references[i]}
            file.write(json.dumps(row) + "\n")
    metrics["images"] = float(len(ids))
    metrics["skipped_samples"] = float(len(skipped))
    return metrics


def classifier(
    model: Polymodal, spec: Mapping, batch_size: int, out_dir: Path, name: str
) -> dict[str, float]:
    """Accuracy of the checkpoint's fine-tuned classifier head on `shards`, labelled by the
    json attribute it was trained on (samples without one of its classes are not scored)."""
    if model.classifier is None:
        raise ConfigError(
            f"eval.benchmarks.{name}: kind classifier needs a checkpoint with a classifier "
            "head (fine-tuned with task=classify, e.g. experiment=finetune_digits)"
        )
    data = model.embed_shards(spec["shards"], batch_size)
    attribute, classes = model.classifier["attribute"], model.classifier["classes"]
    labels = label_indices(data["meta"], attribute, classes)
    keep = labels >= 0
    if not keep.any():
        raise ConfigError(
            f"eval.benchmarks.{name}.shards: no sample's json has a {attribute!r} field with "
            f"one of the head's classes ({', '.join(classes[:5])}, ...)"
        )
    with torch.no_grad():
        logits = model.module.model.classify(data[model.modality][keep].to(model.device))
    metrics = classification_metrics(logits.float().cpu(), labels[keep])
    metrics = {f"{attribute}_{key}": value for key, value in metrics.items()}
    metrics["samples"] = float(keep.sum())
    return metrics


BENCHMARKS = {
    "zeroshot_retrieval": zeroshot_retrieval,
    "linear_probe": probe,
    "captioning": captioning,
    "classifier": classifier,
}


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """Every benchmark of `cfg.eval.benchmarks` on `cfg.ckpt_path`; flat `<name>/<metric>`."""
    model = polymodal.load(cfg.ckpt_path, device=cfg.device)
    if cfg.get("modality"):
        model.modality = cfg.modality
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


def log_results(cfg: DictConfig, metrics: dict[str, float], out_dir: Path) -> None:
    """The metrics to every logger of `cfg.logger` (none unless asked, e.g. logger=wandb),
    and to wandb also the pictures, tables and captions the benchmarks wrote."""
    loggers = instantiate_group(cfg.get("logger"), "logger")
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger):
            log_eval_files(logger, out_dir)
        logger.save()
    if loggers:
        finish_wandb()


@hydra_app("eval")
def main(cfg: DictConfig) -> None:
    check_types(cfg)
    out_dir = Path(cfg.paths.output_dir)
    metrics = evaluate(cfg, out_dir)
    write_metrics(metrics, out_dir, "eval_metrics.json")
    log_results(cfg, metrics, out_dir)
    print_metrics(metrics, out_dir, title="evaluation")


if __name__ == "__main__":
    main()
