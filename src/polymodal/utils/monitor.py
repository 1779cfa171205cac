"""The metric a run is judged by: returned to sweepers, monitored by the best checkpoint.

`optimized_metric: auto` follows what the run validates, decided here alone: the val
perplexity of a language model of text alone (`model.modalities=[text]`), else zero-shot
mean accuracy when `data.zeroshot` is set, else mean retrieval R@1 when there are val
shards and `task.evaluation.retrieval`, else the val loss; without val shards, the train
loss. With `data.val_sets`, the same for the first set (`val/<name>/...`). An explicit
name is kept. The direction follows the name (losses and ranks: min).
"""

from __future__ import annotations

from omegaconf import DictConfig

AUTO = "auto"


def val_prefix(name: str) -> str:
    """Where a val set's metrics go: `val/<name>/` (data.val_sets), `val/` for the set
    "" (data.val_shards)."""
    return f"val/{name}/" if name else "val/"


def optimized_metric(cfg: DictConfig) -> str:
    """`cfg.optimized_metric`, with `auto` resolved from the data and task config."""
    name = cfg.get("optimized_metric") or AUTO
    if name != AUTO:
        return name
    data, evaluation = cfg.data, cfg.task.get("evaluation") or {}
    if data.get("val_sets"):  # the first val set's metric
        name, spec = next(iter(data.val_sets.items()))
        prefix, zeroshot = val_prefix(name), spec.get("zeroshot")
    elif data.get("val_shards") is not None:
        prefix, zeroshot = val_prefix(""), data.get("zeroshot")
    else:
        return "train/loss"
    if list(cfg.model.get("modalities") or []) == ["text"]:
        return f"{prefix}lm/perplexity"
    if zeroshot:
        return f"{prefix}zeroshot/mean_acc"
    if evaluation.get("retrieval", True):
        return f"{prefix}retrieval/mean_r1"
    return f"{prefix}loss"


def metric_mode(name: str) -> str:
    """`min` for losses, ranks, error rates and perplexities (`val/loss`,
    `val/retrieval/i2t_mean_rank`, `val/caption/wer`, `val/lm/perplexity`), else `max`."""
    return "min" if name.endswith(("loss", "_rank", "wer", "perplexity", "nll")) else "max"
