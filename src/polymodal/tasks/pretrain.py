"""PretrainModule: one LightningModule that sums weighted objectives over one Backbone.

Per-task modules (CLIP, ITM, MLM, ...) are Hydra presets of this class with one objective;
recipes (ALBEF, CoCa, FLAVA, BLIP) list several. An objective with weight 0 is never built.
"""

from __future__ import annotations

import inspect
import json
import logging
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_object, instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from polymodal.data.shardtools import values_reader
from polymodal.evaluation.captioning import attribute_match_rate, caption_scores
from polymodal.evaluation.evaluator import EmbeddingEvaluator
from polymodal.evaluation.media import retrieval_examples, write_media
from polymodal.evaluation.retrieval import reranked_recall_at_1
from polymodal.evaluation.zeroshot import zeroshot_tasks
from polymodal.models.backbone import Backbone
from polymodal.objectives.base import EncodingCache, Objective
from polymodal.tasks.optim import param_groups, warmup_cosine
from polymodal.utils.distributed import (
    full_params,
    gather_objects,
    gather_variable,
    rank_and_world,
    ranks_agree,
    weights_digest,
)
from polymodal.utils.errors import ConfigError
from polymodal.utils.loggers import log_media_to_wandb

log = logging.getLogger(__name__)


def _plain(cfg: Mapping | None) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


# The class an objective name stands for when its spec has no `_target_`, so that
# `+task.objectives.mim.weight=0.5` is all it takes to add MIM to a run.
OBJECTIVES = {
    "itc": "polymodal.objectives.itc.ITCObjective",
    "siglip": "polymodal.objectives.siglip.SigLIPObjective",
    "itm": "polymodal.objectives.itm.ITMObjective",
    "mlm": "polymodal.objectives.mlm.MLMObjective",
    "mim": "polymodal.objectives.mim.MIMObjective",
    "caption": "polymodal.objectives.caption.CaptionObjective",
}


# where `task.optimizer.fused=null` picks the fused AdamW kernel: measured 4x faster than
# the for-each one on this CPU (1.1 vs 4.1 ms per step for the default model)
FUSED_OPTIMIZER_DEVICES = ("cuda", "cpu")


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the FLOPs of the CUDA attention kernels but not of the CPU one
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops
}


def build_objectives(
    specs: Mapping, backbone: Backbone, shared: Mapping | None = None
) -> tuple[nn.ModuleDict, dict[str, float]]:
    """`{name: {weight: w, [_target_: ...], **kwargs}}` -> modules and weights (w != 0 only).

    Objectives whose constructor takes `backbone` get it (to size heads and to build the
    fusion encoder or decoder they need). `shared` (`task.loss`: local_loss,
    gather_with_grad, ...) goes to every objective whose constructor takes that argument,
    unless its own spec sets it.
    """
    modules, weights = nn.ModuleDict(), {}
    for name, spec in specs.items():
        spec = dict(spec)
        if "weight" not in spec:
            raise ConfigError(f"task.objectives.{name}.weight is missing")
        weight = float(spec.pop("weight"))
        if weight == 0:
            continue
        if "_target_" not in spec:
            if name not in OBJECTIVES:
                raise ConfigError(
                    f"task.objectives.{name}: unknown objective (known: {sorted(OBJECTIVES)}); "
                    "set its _target_"
                )
            spec["_target_"] = OBJECTIVES[name]
        target = get_object(spec["_target_"])
        accepted = inspect.signature(target).parameters
        if "backbone" in accepted:
            spec["backbone"] = backbone
        for key, value in (shared or {}).items():
            if key in accepted:
                spec.setdefault(key, value)
        objective = instantiate(spec)
        if not isinstance(objective, Objective):
            raise ConfigError(f"task.objectives.{name}: {type(objective).__name__} is no Objective")
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
        loss: Mapping | None = None,
        seed: int = 0,
        max_nonfinite_steps: int = 8,
    ) -> None:
        super().__init__()
        objectives, optimizer, scheduler = _plain(objectives), _plain(optimizer), _plain(scheduler)
        evaluation, loss = _plain(evaluation), _plain(loss)
        # plain containers (no DictConfig), so checkpoints load with torch's weights_only
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.objectives, self.weights = build_objectives(objectives, backbone, loss)
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.seed = seed
        if max_nonfinite_steps < 1:
            raise ConfigError(f"task.max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.nonfinite_in_a_row = 0
        self._loss_finite: Tensor | None = None
        evaluation = dict(evaluation or {})
        self.caption_batches = int(evaluation.pop("caption_batches", 2))
        self.itm_rerank_k = int(evaluation.pop("itm_rerank_k", 16))
        self.media_samples = int(evaluation.pop("media_samples", 8))
        self.generation_cfg = dict(evaluation.pop("generation", {}) or {})
        self.evaluation_cfg = evaluation
        self.evaluator: EmbeddingEvaluator | None = None
        self.tokenizer = None
        # the resolved run config; the app sets it, and checkpoints carry it (polymodal.load)
        self.run_config: dict | None = None
        self.skipped_samples: Counter[str] = Counter()  # reason -> samples, this rank
        self._captions: list[tuple[str, str, dict]] = []
        self._val_tokens: list[tuple[Tensor, Tensor, Tensor]] = []
        self._media_images: Tensor | None = None

    def setup(self, stage: str) -> None:
        """Take the tokenizer and the zero-shot spec from the datamodule (they describe data);
        class names `values` are read from the val shards' json here."""
        datamodule = self.trainer.datamodule
        self.tokenizer = datamodule.tokenizer
        rows = self.backbone.vocab_size
        if self.tokenizer.vocab_size > rows:
            raise ConfigError(
                f"model.vocab_size={rows} < tokenizer vocabulary {self.tokenizer.vocab_size} "
                f"({datamodule.tokenizer_path})"
            )
        spec = _plain(getattr(datamodule, "zeroshot", None))
        values = values_reader(getattr(datamodule, "val_shards", None), "data.val_shards")
        zeroshot = zeroshot_tasks(spec, "data.zeroshot", values)
        self.evaluator = EmbeddingEvaluator(zeroshot, **self.evaluation_cfg)
        class_names = {a: task.classes for a, task in zeroshot.items()}
        for objective in self.objectives.values():
            objective.setup(self.tokenizer, class_names)

    def step_losses(self, cache: EncodingCache) -> tuple[Tensor, dict[str, Tensor]]:
        total, logs = 0.0, {}
        for name, objective in self.objectives.items():
            out = objective(cache)
            total = total + self.weights[name] * out.loss
            logs[f"{name}/loss"] = out.loss.detach()
            logs.update({f"{name}/{k}": v for k, v in out.logs.items()})
        return total, logs

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Seed this micro-batch's random choices (masks, hard negatives, dropout) from
        (seed, rank, step, micro-batch) alone, so a resumed run draws exactly what the
        uninterrupted one drew, whatever ran in between (loader start, FLOP count)."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        key = f"{self.seed}-{self.global_rank}-{self.global_step}-{micro}"
        torch.manual_seed(zlib.crc32(key.encode()))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, logs = self.step_losses(EncodingCache(self.backbone, batch))
        finite = torch.isfinite(loss.detach())  # every micro-batch of the step counts
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.skipped_samples.update(batch.get("skipped", {}))
        size = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        # this rank's running count (a per-step all-reduce would cost a sync every step);
        # on_train_end reports the sum over ranks
        self.log("data/skipped_samples", float(self.skipped_samples.total()), batch_size=size)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=size)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update when a loss of the step or a gradient is not finite (every rank
        agrees), count it, and stop the run after `max_nonfinite_steps` in a row: a
        diverged run must not go on to write NaN weights as its last and best checkpoints.
        Under fp16 loss scaling the gradients are left to the scaler, whose routine
        overflow steps are no divergence. Costs one host sync per optimizer step."""
        loss_finite, self._loss_finite = self._loss_finite, None
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if loss_finite is not None:
            bad = bad | ~loss_finite
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        if not bad.item():
            self.nonfinite_in_a_row = 0
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without grads alone
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite loss or gradient; update skipped", self.global_step)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise ConfigError(
                f"training diverged: {self.nonfinite_in_a_row} optimizer steps in a row had a "
                f"non-finite loss or gradient (up to step {self.global_step}); lower "
                "task.optimizer.lr or raise task.scheduler.warmup_steps"
            )

    @torch.no_grad()
    def flops_per_sample(self, batch: dict) -> float:
        """Training FLOPs per sample: the forward FLOPs of every objective on `batch`
        (torch's FlopCounterMode; the random state and buffers are left untouched, so a
        resumed run is not changed by counting again) times 3, since the
        backward pass costs about twice the forward."""
        cuda = [self.device.index] if self.device.type == "cuda" else []
        buffers = [(b, b.clone()) for b in self.buffers()]  # e.g. BatchNorm statistics
        with (
            torch.random.fork_rng(devices=cuda),
            full_params(self.trainer.model),
            FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter,
        ):
            self.step_losses(EncodingCache(self.backbone, batch))
        for buffer, saved in buffers:
            buffer.copy_(saved)
        return 3 * counter.get_total_flops() / batch["image"].shape[0]

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for objective in self.objectives.values():
            objective.after_optimizer_step()

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Under FSDP the norm is clipped by the wrapper, the only one that sees every shard
        (Lightning's own clipping refuses FSDP)."""
        model = self.trainer.model
        if gradient_clip_val and isinstance(model, FullyShardedDataParallel):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError("trainer.gradient_clip_algorithm: FSDP clips by norm only")
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Everything `polymodal.load` needs besides the weights: config and tokenizer.
        Refuses (stopping the run) to write weights that are not finite."""
        bad = [n for n, t in checkpoint["state_dict"].items() if not torch.isfinite(t).all()]
        if bad:
            raise ConfigError(
                f"step {self.global_step}: {len(bad)} weight tensor(s) are not finite "
                f"(e.g. {bad[0]}); refusing to save a checkpoint"
            )
        if self.run_config is not None and self.tokenizer is not None:
            checkpoint["polymodal"] = {
                "config": self.run_config,
                "tokenizer": self.tokenizer.__getstate__(),
            }
        # every rank runs this hook, so the per-rank skip counts can be summed here
        checkpoint["counters"] = {
            "skipped_samples": dict(self.total_skipped()),
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Counts continue across a resume (rank 0 carries the skips so far)."""
        counters = checkpoint.get("counters", {})
        if self.global_rank == 0:
            self.skipped_samples = Counter(counters.get("skipped_samples", {}))
        self.nonfinite_steps = counters.get("nonfinite_steps", 0)
        self.nonfinite_in_a_row = counters.get("nonfinite_in_a_row", 0)

    def total_skipped(self) -> Counter[str]:
        """Samples skipped so far on all ranks, by reason (a collective)."""
        return sum((Counter(c) for c in gather_objects([dict(self.skipped_samples)])), Counter())

    def on_train_end(self) -> None:
        """Facts the app reports after fit. Put on callback_metrics because that is all a
        ddp_spawn run sends back to the launching process."""
        skipped = self.total_skipped()
        facts = {
            "train/global_step": float(self.global_step),
            "data/skipped_samples": float(skipped.total()),
            "train/nonfinite_steps": float(self.nonfinite_steps),
            **{f"data/skipped/{reason}": float(n) for reason, n in sorted(skipped.items())},
        }
        if self.trainer.world_size > 1:
            facts["dist/ranks_same_step"] = float(ranks_agree(self.global_step))
        if isinstance(self.trainer.strategy, DDPStrategy):
            facts["dist/ranks_in_sync"] = float(ranks_agree(weights_digest(self)))
        for key, value in facts.items():
            self.trainer.callback_metrics[key] = torch.tensor(value)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()
        self._captions, self._val_tokens = [], []
        self._media_images = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = batch["image"].shape[0]
        cache = EncodingCache(self.backbone, batch)
        # masks and negatives drawn in validation are seeded per batch, so val metrics
        # are comparable across evaluations and training's random stream is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            loss, logs = self.step_losses(cache)
            self.log("val/loss", loss, batch_size=size, sync_dist=True)
            logs = {f"val/{k}": v for k, v in logs.items()}
            self.log_dict(logs, batch_size=size, sync_dist=True)
            for name, objective in self.objectives.items():
                for key, (value, count) in objective.validation_metrics(cache).items():
                    self.log(f"val/{name}/{key}", value, batch_size=count, sync_dist=True)
        self.evaluator.update(
            cache.image_embedding(), cache.text_embedding(), batch["meta"], batch["text"]
        )
        if batch_idx == 0:  # rank 0's first images lead the gathered val set
            self._media_images = batch["image"][: self.media_samples].detach().cpu()
        if "itm" in self.objectives and self.itm_rerank_k > 0:
            tokens = (cache.image_tokens(), cache.text_tokens(), batch["text_mask"])
            self._val_tokens.append(tuple(t.detach() for t in tokens))
        if self.backbone.decoder is not None and batch_idx < self.caption_batches:
            generated = self.generate(image_tokens=cache.image_tokens(), **self.generation_cfg)
            self._captions += list(zip(generated, batch["text"], batch["meta"], strict=True))

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        ids, mask = self.tokenizer.encode(prompts)
        return self.backbone.embed_text(ids.to(self.device), mask.to(self.device))

    def on_validation_epoch_end(self) -> None:
        # each rank validated its share of the val set: score the whole set on every rank
        self.evaluator.gather(self.device)
        self._captions = gather_objects(self._captions)
        self._val_tokens = self.gathered_val_tokens()
        with full_params(self.trainer.model):  # the text tower runs outside a step here
            metrics = self.evaluator.compute(self.encode_prompts)
            if self._val_tokens:
                metrics.update(self.itm_rerank_metrics())
        if self._captions:
            metrics.update(self.caption_metrics())
            self.log_caption_samples()
        if self.media_samples > 0 and self.trainer.is_global_zero:
            self.log_media()
        # identical on every rank; sync_dist only tells Lightning so (no extra meaning)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self.evaluator.reset()

    def gathered_val_tokens(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Every rank's (image tokens, text tokens, text mask) for ITM re-ranking."""
        if rank_and_world()[1] == 1 or not self._val_tokens:
            return self._val_tokens
        return [tuple(gather_variable(torch.cat(t)) for t in zip(*self._val_tokens, strict=True))]

    def caption_metrics(self) -> dict[str, float]:
        """BLEU-4 / CIDEr of generated captions against the val captions, and how often
        a caption names the right colour and shape (single-object images)."""
        predictions = {str(i): c[0] for i, c in enumerate(self._captions)}
        references = {str(i): [c[1]] for i, c in enumerate(self._captions)}
        scores = caption_scores(predictions, references)
        metrics = {"caption/bleu4": scores["bleu4"], "caption/cider": scores["cider"]}
        metas = [c[2] for c in self._captions]
        if any("color" in m and "shape" in m for m in metas):
            generated = [c[0] for c in self._captions]
            metrics["caption/attribute_match"] = attribute_match_rate(generated, metas)
        return metrics

    def log_caption_samples(self, count: int = 16) -> None:
        """A few generated captions next to the references: a wandb table when wandb is
        a logger, and always `<root>/samples/captions_step<N>.jsonl`."""
        rows = [[generated, reference] for generated, reference, _ in self._captions[:count]]
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="val/captions", columns=["generated", "reference"], data=rows)
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"generated": g, "reference": r}) for g, r in rows]
            (out / f"captions_step{self.global_step}.jsonl").write_text("\n".join(lines) + "\n")

    def log_media(self) -> None:
        """Zero-shot confusion matrices and retrieval examples of this validation: PNG and
        CSV under `<root>/media/` (suffix `_step<N>`), and images + a table in wandb."""
        if self.trainer.sanity_checking:
            return
        examples = None
        if self.evaluator.retrieval and self._media_images is not None:
            image_emb, text_emb = self.evaluator.embeddings()
            examples = retrieval_examples(
                self._media_images, image_emb, text_emb, self.evaluator.captions
            )
        confusion = {a: (m, self.evaluator.classes(a)) for a, m in self.evaluator.confusion.items()}
        out = Path(self.trainer.default_root_dir) / "media"
        pictures = write_media(out, f"_step{self.global_step}", confusion, examples)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                log_media_to_wandb(logger, pictures, examples, self.global_step)

    @torch.no_grad()
    def itm_rerank_metrics(self, chunk_size: int = 512) -> dict[str, float]:
        """Retrieval R@1 with each query's ITC top-k re-ranked by the ITM head."""
        image_tokens, text_tokens, text_mask = (
            torch.cat(t) for t in zip(*self._val_tokens, strict=True)
        )
        image_emb, text_emb = (e.to(self.device) for e in self.evaluator.embeddings())
        first, sample_to_image = (t.to(self.device) for t in self.evaluator.image_groups())
        image_emb, image_tokens = image_emb[first], image_tokens[first]  # one per image
        itm = self.objectives["itm"]

        def score(image_index: Tensor, text_index: Tensor) -> Tensor:
            scores = []
            for start in range(0, len(image_index), chunk_size):
                i = image_index[start : start + chunk_size]
                t = text_index[start : start + chunk_size]
                logits = itm.pair_logits(
                    self.backbone, text_tokens[t], text_mask[t], image_tokens[i]
                )
                scores.append(logits.softmax(dim=-1)[:, 1])
            return torch.cat(scores)

        result = reranked_recall_at_1(
            image_emb, text_emb, sample_to_image, score, k=self.itm_rerank_k
        )
        return {f"retrieval/{k}": v for k, v in result.items()}

    @torch.no_grad()
    def generate(
        self, images: Tensor | None = None, image_tokens: Tensor | None = None, **kwargs
    ) -> list[str]:
        """Captions for a batch of preprocessed images, or of their already encoded tokens
        (strategy, num_beams, ... as in `polymodal.models.generation.generate`)."""
        tok = self.tokenizer
        ids, _ = self.backbone.generate(
            None if images is None else images.to(self.device),
            image_tokens,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            **kwargs,
        )
        return tok.decode_batch(ids)

    def configure_optimizers(self):
        cfg = dict(self.optimizer_cfg)
        weight_decay = cfg.pop("weight_decay", 0.0)
        if "fused" in cfg and cfg["fused"] is None:
            # Lightning's AMP plugin refuses to clip the gradients of a fused optimizer
            amp = isinstance(self.trainer.precision_plugin, MixedPrecision)
            cfg["fused"] = self.device.type in FUSED_OPTIMIZER_DEVICES and not amp
        optimizer = instantiate(cfg)(param_groups(self, weight_decay))
        # the schedule spans max_steps: the training stream has no length, and Lightning's
        # estimated_stepping_batches would set the loaders up early (Lightning issue 20550)
        total = self.trainer.max_steps if self.trainer else 0
        if total <= 0:
            raise ConfigError("trainer.max_steps must be > 0: the learning-rate schedule spans it")
        scheduler = warmup_cosine(
            optimizer,
            warmup_steps=int(self.scheduler_cfg.get("warmup_steps", 0)),
            total_steps=int(total),
            min_lr_ratio=float(self.scheduler_cfg.get("min_lr_ratio", 0.0)),
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
