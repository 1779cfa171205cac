"""PretrainModule: one LightningModule that sums weighted objectives over one Backbone.

Per-task modules (CLIP, ...) are Hydra presets of this class with one objective; recipes
list several. An objective with weight 0 is never built.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from polymodal.evaluation.evaluator import EmbeddingEvaluator
from polymodal.models.backbone import Backbone
from polymodal.objectives.base import EncodingCache, Objective
from polymodal.tasks.optim import param_groups, warmup_cosine
from polymodal.utils.errors import ConfigError


def _plain(cfg: Mapping | None) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_objectives(specs: Mapping) -> tuple[nn.ModuleDict, dict[str, float]]:
    """`{name: {weight: w, _target_: ..., **kwargs}}` -> modules and weights (w != 0 only)."""
    modules, weights = nn.ModuleDict(), {}
    for name, spec in specs.items():
        spec = dict(spec)
        if "weight" not in spec:
            raise ConfigError(f"task.objectives.{name}.weight is missing")
        weight = float(spec.pop("weight"))
        if weight == 0:
            continue
        objective = instantiate(spec)
        if not isinstance(objective, Objective):
            raise TypeError(f"task.objectives.{name}: {type(objective).__name__} is no Objective")
        modules[name], weights[name] = objective, weight
    if not modules:
        raise ConfigError("task.objectives: every objective has weight 0; nothing to train")
    return modules, weights


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        objectives: Mapping,
        optimizer: Mapping,
        scheduler: Mapping,
        evaluation: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.objectives, self.weights = build_objectives(_plain(objectives))
        self.optimizer_cfg = _plain(optimizer)
        self.scheduler_cfg = _plain(scheduler)
        self.evaluation_cfg = _plain(evaluation) or {}
        self.evaluator: EmbeddingEvaluator | None = None
        self.tokenizer = None
        self.skipped_samples = 0

    def setup(self, stage: str) -> None:
        """Take the tokenizer and the zero-shot spec from the datamodule (they describe data)."""
        datamodule = self.trainer.datamodule
        self.tokenizer = datamodule.tokenizer
        rows = self.backbone.text_tower.token_embedding.num_embeddings
        if self.tokenizer.vocab_size > rows:
            raise ConfigError(
                f"model.vocab_size={rows} < tokenizer vocabulary {self.tokenizer.vocab_size} "
                f"({datamodule.tokenizer_path})"
            )
        zeroshot = _plain(getattr(datamodule, "zeroshot", None)) or {}
        self.evaluator = EmbeddingEvaluator(**zeroshot, **self.evaluation_cfg)

    def step_losses(self, cache: EncodingCache) -> tuple[Tensor, dict[str, Tensor]]:
        total, logs = 0.0, {}
        for name, objective in self.objectives.items():
            out = objective(cache)
            total = total + self.weights[name] * out.loss
            logs[f"{name}/loss"] = out.loss.detach()
            logs.update({f"{name}/{k}": v for k, v in out.logs.items()})
        logs["loss"] = total.detach()
        return total, logs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, logs = self.step_losses(EncodingCache(self.backbone, batch))
        self.skipped_samples += int(batch.get("skipped", 0))
        size = batch["image"].shape[0]
        loss_value = logs.pop("loss")
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=size)
        self.log("train/loss", loss_value, prog_bar=True, batch_size=size)
        self.log("data/skipped_samples", float(self.skipped_samples), batch_size=size)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for objective in self.objectives.values():
            objective.after_optimizer_step()

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        cache = EncodingCache(self.backbone, batch)
        _, logs = self.step_losses(cache)
        self.log("val/loss", logs["loss"], batch_size=batch["image"].shape[0])
        self.evaluator.update(cache.image_embedding(), cache.text_embedding(), batch["meta"])

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        ids, mask = self.tokenizer.encode(prompts)
        return self.backbone.embed_text(ids.to(self.device), mask.to(self.device))

    def on_validation_epoch_end(self) -> None:
        metrics = self.evaluator.compute(self.encode_prompts)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})
        self.evaluator.reset()

    def configure_optimizers(self):
        cfg = dict(self.optimizer_cfg)
        weight_decay = cfg.pop("weight_decay", 0.0)
        optimizer = instantiate(cfg)(param_groups(self, weight_decay))
        total = self.trainer.estimated_stepping_batches if self.trainer else 0
        scheduler = warmup_cosine(
            optimizer,
            warmup_steps=int(self.scheduler_cfg.get("warmup_steps", 0)),
            total_steps=int(total),
            min_lr_ratio=float(self.scheduler_cfg.get("min_lr_ratio", 0.0)),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
