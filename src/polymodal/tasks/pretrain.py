"""PretrainModule: one LightningModule that sums weighted objectives over one model.

Per-task modules (CLIP, ITM, MLM, ...) are Hydra presets of this class with one objective;
recipes (ALBEF, CoCa, FLAVA, BLIP) list several. An objective with weight 0 is never built,
and `build_module` gives the model the parts the built objectives need.
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
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from polymodal.data.shardtools import values_reader
from polymodal.evaluation.media import log_media_to_wandb
from polymodal.evaluation.validation import ValidationReport, write_evaluation_media
from polymodal.evaluation.zeroshot import build_zeroshot_classifier, zeroshot_tasks
from polymodal.models.model import BATCH_NORM, PolymodalModel, buffers_kept
from polymodal.objectives.base import EncodingCache, NoPairedModality, Objective
from polymodal.objectives.classify import ClassifyObjective
from polymodal.objectives.lm import LMObjective
from polymodal.tasks.optim import param_groups, warmup_cosine
from polymodal.utils.distributed import (
    full_params,
    gather_objects,
    ranks_agree,
    weights_digest,
)
from polymodal.utils.errors import ConfigError
from polymodal.utils.instantiate import plain_dict
from polymodal.utils.monitor import val_prefix

log = logging.getLogger(__name__)


# The class an objective name stands for when its spec has no `_target_`, so that
# `+task.objectives.mim.weight=0.5` is all it takes to add MIM to a run.
OBJECTIVES = {
    "itc": "polymodal.objectives.itc.ITCObjective",
    "siglip": "polymodal.objectives.siglip.SigLIPObjective",
    "itm": "polymodal.objectives.itm.ITMObjective",
    "mlm": "polymodal.objectives.mlm.MLMObjective",
    "mim": "polymodal.objectives.mim.MIMObjective",
    "caption": "polymodal.objectives.caption.CaptionObjective",
    "lm": "polymodal.objectives.lm.LMObjective",
    "classify": "polymodal.objectives.classify.ClassifyObjective",
}
# a fine-tuning run's start, in its output directory (not among the checkpoints it may
# resume from: the file holds weights only)
ZEROSHOT_CHECKPOINT = "zeroshot.ckpt"


# where `task.optimizer.fused=null` picks the fused AdamW kernel: measured 4x faster than
# the for-each one on this CPU (1.1 vs 4.1 ms per step for the default model)
FUSED_OPTIMIZER_DEVICES = ("cuda", "cpu")


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the FLOPs of the CUDA attention kernels but not of the CPU one
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops
}


def objective_specs(specs: Mapping) -> dict[str, tuple[float, dict]]:
    """`{name: {weight: w, [_target_: ...], **kwargs}}` -> {name: (w, spec with _target_)}
    for the objectives with w != 0."""
    result = {}
    for name, spec in plain_dict(specs).items():
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
        result[name] = (weight, spec)
    return result


def objective_class(name: str, spec: Mapping) -> type[Objective]:
    target = get_object(spec["_target_"])
    if not (isinstance(target, type) and issubclass(target, Objective)):
        raise ConfigError(f"task.objectives.{name}: {spec['_target_']} is no Objective")
    return target


def required_parts(specs: Mapping) -> list[str]:
    """The model parts (heads, temperature, decoder, ...) the objectives of `specs` use."""
    parts = []
    for name, (_, spec) in objective_specs(specs).items():
        parts += [p for p in objective_class(name, spec).parts if p not in parts]
    return parts


def build_module(cfg: DictConfig) -> PretrainModule:
    """The task module of a composed run config, over a model built with the parts its
    objectives need. `cfg.model.parts` is updated to them, and part settings the model
    config leaves null to the objectives' `part_defaults` (the first objective that has
    one wins), so the run config a checkpoint carries rebuilds the same model."""
    parts = list(cfg.model.get("parts") or [])
    cfg.model.parts = parts + [p for p in required_parts(cfg.task.objectives) if p not in parts]
    for name, (_, spec) in objective_specs(cfg.task.objectives).items():
        for part, settings in objective_class(name, spec).part_defaults.items():
            for key, value in settings.items():
                if cfg.model.get(part) is not None and cfg.model[part].get(key) is None:
                    cfg.model[part][key] = value
    return instantiate(cfg.task, model=instantiate(cfg.model))


def applies(objective: Objective, cache: EncodingCache) -> bool:
    """Whether the batch holds every modality the objective needs."""
    try:
        return all(cache.holds(m) for m in objective.needs(cache))
    except NoPairedModality:  # a model without the modality it names still fails loudly
        return False


def build_objectives(
    specs: Mapping, shared: Mapping | None = None
) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Objective modules and their weights (w != 0 only). `shared` (`task.loss`:
    local_loss, gather_with_grad, ...) goes to every objective whose constructor takes
    that argument, unless its own spec sets it."""
    modules, weights = nn.ModuleDict(), {}
    for name, (weight, spec) in objective_specs(specs).items():
        accepted = inspect.signature(objective_class(name, spec)).parameters
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
        model: PolymodalModel,
        objectives: Mapping,
        optimizer: Mapping,
        scheduler: Mapping,
        evaluation: Mapping | None = None,
        loss: Mapping | None = None,
        seed: int = 0,
        max_nonfinite_steps: int = 8,
    ) -> None:
        super().__init__()
        objectives, optimizer, scheduler = (
            plain_dict(objectives),
            plain_dict(optimizer),
            plain_dict(scheduler),
        )
        evaluation, loss = plain_dict(evaluation), plain_dict(loss)
        # plain containers (no DictConfig), so checkpoints load with torch's weights_only
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.objectives, self.weights = build_objectives(objectives, loss)
        for name, objective in self.objectives.items():
            missing = [p for p in objective.parts if p not in model.parts]
            if missing:
                raise ConfigError(
                    f"task.objectives.{name} needs model parts {missing} (model.parts: "
                    f"{model.parts}); build the model with polymodal.tasks.pretrain.build_module"
                )
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.seed = seed
        if max_nonfinite_steps < 1:
            raise ConfigError(f"task.max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.nonfinite_in_a_row = 0
        self._loss_finite: Tensor | None = None
        self.evaluation_cfg = evaluation
        # val set name ("" for data.val_shards) -> its report, metrics under val/[<name>/]
        self.reports: dict[str, ValidationReport] = {}
        self.tokenizer = None
        # the resolved run config; the app sets it, and checkpoints carry it (polymodal.load)
        self.run_config: dict | None = None
        self.skipped_samples: Counter[str] = Counter()  # reason -> samples, this rank
        self._zeroshot_head = False  # this process started the classifier zero-shot

    def on_fit_start(self) -> None:
        """Save a zero-shot classifier start as `<run dir>/zeroshot.ckpt` (the "before"
        of fine-tuning, WiSE-FT's other end), and say when micro-batches meet BatchNorm."""
        path = Path(self.trainer.default_root_dir) / ZEROSHOT_CHECKPOINT
        # a resumed fit (ckpt_path known once restored) restored its head over the start
        fresh = self.trainer.ckpt_path is None and not path.exists()
        if self._zeroshot_head and fresh:
            self.trainer.save_checkpoint(path, weights_only=True)
        size = self.model.micro_batch_size
        if size and any(isinstance(m, BATCH_NORM) for m in self.model.modules()):
            log.warning(
                "model.micro_batch_size=%d: BatchNorm layers (e.g. the image conv stem) "
                "normalise each micro-batch by its own statistics, so the gradients are "
                "close to, not equal to, those of the whole batch "
                "(model.stems.image.conv_stem=false has none)",
                size,
            )

    def setup(self, stage: str) -> None:
        """Take the tokenizer and the zero-shot spec from the datamodule (they describe data);
        class names `values` are read from the val shards' json here."""
        datamodule = self.trainer.datamodule
        self.tokenizer = datamodule.tokenizer
        rows = self.model.vocab_size
        if self.tokenizer.vocab_size > rows:
            raise ConfigError(
                f"model.vocab_size={rows} < tokenizer vocabulary {self.tokenizer.vocab_size} "
                f"({datamodule.tokenizer_path})"
            )
        # no val set: one report still resolves data.zeroshot's class names (objectives)
        sets = getattr(datamodule, "validation_sets", None) or {
            "": {
                "shards": getattr(datamodule, "val_shards", None),
                "zeroshot": getattr(datamodule, "zeroshot", None),
                "field": "data.val_shards",
            }
        }
        self.reports, class_names = {}, {}
        evaluation = dict(self.evaluation_cfg)
        if evaluation.get("perplexity") is None:  # a language model's val sets report it
            lm = any(isinstance(o, LMObjective) for o in self.objectives.values())
            evaluation["perplexity"] = lm
        for name, spec in sets.items():
            where = f"data.val_sets.{name}" if name else "data"
            values = values_reader(spec["shards"], spec["field"])
            zeroshot = zeroshot_tasks(plain_dict(spec["zeroshot"]), f"{where}.zeroshot", values)
            self.reports[name] = ValidationReport(zeroshot, **evaluation)
            class_names.update(self.reports[name].class_names)
        for objective in self.objectives.values():
            objective.setup(self.tokenizer, class_names)
        self.start_classifier()

    def classify_objective(self) -> ClassifyObjective | None:
        return next((o for o in self.objectives.values() if isinstance(o, ClassifyObjective)), None)

    @torch.no_grad()
    def start_classifier(self) -> None:
        """The classify objective's head from the zero-shot classifier of its attribute
        (`init: zeroshot`): row c is class c's prompt-ensemble text embedding and the bias
        is zero, so the head at step 0 classifies exactly as zero-shot evaluation does.
        Once per head (`model.classifier_started`): a resumed fit restores its own over
        this start, and the validation after fit, in spawned ranks too, keeps it."""
        objective = self.classify_objective()
        if objective is None:
            return
        head, classes = self.model.classifier, objective.classes
        if head.out_features != len(classes):
            raise ConfigError(
                f"model.classifier.num_classes={head.out_features}, but "
                f"data.zeroshot.{objective.attribute} has {len(classes)} classes"
            )
        if objective.init != "zeroshot" or self.model.classifier_started.item():
            return
        task = next(
            r.evaluator.zeroshot[objective.attribute]
            for r in self.reports.values()
            if objective.attribute in r.evaluator.zeroshot
        )
        modes = {module: module.training for module in self.modules()}
        self.eval()  # prompts encoded as in evaluation
        weights = build_zeroshot_classifier(
            self.encode_prompts, [task.phrases.get(n, n) for n in classes], task.templates
        )
        for module, training in modes.items():
            module.training = training
        head.weight.copy_(weights)
        head.bias.zero_()
        self.model.classifier_started.fill_(True)
        self._zeroshot_head = True

    def step_losses(self, cache: EncodingCache) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the objectives whose modalities the batch holds (a mix of
        sources leaves some out of some batches) and what they log."""
        total, logs = None, {}
        for name, objective in self.objectives.items():
            if not applies(objective, cache):
                continue
            out = objective(cache)
            weighted = self.weights[name] * out.loss
            total = weighted if total is None else total + weighted
            logs[f"{name}/loss"] = out.loss.detach()
            logs.update({f"{name}/{k}": v for k, v in out.logs.items()})
        if total is None:
            source = f" of data.sources.{cache.batch['source']}" if "source" in cache.batch else ""
            raise ConfigError(
                f"a batch{source} holds none of the modalities any of task.objectives "
                f"({list(self.objectives)}) needs"
            )
        return total, logs

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Seed this micro-batch's random choices (masks, hard negatives, dropout) from
        (seed, rank, step, micro-batch) alone, so a resumed run draws exactly what the
        uninterrupted one drew, whatever ran in between (loader start, FLOP count)."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        key = f"{self.seed}-{self.global_rank}-{self.global_step}-{micro}"
        torch.manual_seed(zlib.crc32(key.encode()))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, logs = self.step_losses(EncodingCache(self.model, batch))
        finite = torch.isfinite(loss.detach())  # every micro-batch of the step counts
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.skipped_samples.update(batch.get("skipped", {}))
        size = len(batch["key"])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        if "source" in batch:  # a mix of sources: each one's loss too
            self.log(f"train/sources/{batch['source']}/loss", loss.detach(), batch_size=size)
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
        with (
            torch.random.fork_rng(devices=cuda),
            buffers_kept(self),  # e.g. BatchNorm statistics
            full_params(self.trainer.model),
            FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter,
        ):
            self.step_losses(EncodingCache(self.model, batch))
        return 3 * counter.get_total_flops() / len(batch["key"])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.after_optimizer_step()

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
            if (objective := self.classify_objective()) is not None:  # the head's labels
                checkpoint["polymodal"]["classifier"] = {
                    "attribute": objective.attribute,
                    "classes": list(objective.classes),
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
        for report in self.reports.values():
            report.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = list(self.reports)[dataloader_idx]
        prefix, size = val_prefix(name), len(batch["key"])
        cache = EncodingCache(self.model, batch)
        # masks and negatives drawn in validation are seeded per batch, so val metrics
        # are comparable across evaluations and training's random stream is untouched;
        # names are unique per val set, so Lightning needs no dataloader_idx suffix
        log = {"batch_size": size, "sync_dist": True, "add_dataloader_idx": False}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            loss, logs = self.step_losses(cache)
            self.log(f"{prefix}loss", loss, **log)
            self.log_dict({f"{prefix}{k}": v for k, v in logs.items()}, **log)
            for objective_name, objective in self.objectives.items():
                if not applies(objective, cache):
                    continue
                for key, (value, count) in objective.validation_metrics(cache).items():
                    self.log(
                        f"{prefix}{objective_name}/{key}",
                        value,
                        **{**log, "batch_size": count},
                    )
        self.reports[name].update(cache, batch_idx, self.generate)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        ids, mask = self.tokenizer.encode(prompts)
        return self.model.embed("text", ids.to(self.device), mask.to(self.device))

    def on_validation_epoch_end(self) -> None:
        for name, report in self.reports.items():
            with full_params(self.trainer.model):  # the text tower runs outside a step here
                metrics = report.compute(self.model, self.encode_prompts)
            if report.captions:
                self.log_caption_samples(name, report)
            if report.media_samples > 0 and self.trainer.is_global_zero:
                self.log_media(name, report)
            # identical on every rank; sync_dist only tells Lightning so (no extra meaning)
            prefix = val_prefix(name)
            self.log_dict(
                {f"{prefix}{k}": v for k, v in metrics.items()},
                sync_dist=True,
                add_dataloader_idx=False,
            )
            report.reset()

    def log_caption_samples(self, name: str, report: ValidationReport) -> None:
        """A few generated captions next to the references: a wandb table when wandb is
        a logger, and always `<root>/samples/captions[_<val set>]_step<N>.jsonl`."""
        rows = report.caption_rows()
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                key = f"{val_prefix(name)}captions"
                logger.log_text(key=key, columns=["generated", "reference"], data=rows)
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"generated": g, "reference": r}) for g, r in rows]
            stem = f"captions_{name}" if name else "captions"
            (out / f"{stem}_step{self.global_step}.jsonl").write_text("\n".join(lines) + "\n")

    def log_media(self, name: str, report: ValidationReport) -> None:
        """Zero-shot confusion matrices and retrieval examples of this validation: PNG and
        CSV under `<root>/media/` (suffix `[_<val set>]_step<N>`), and images + a table in
        wandb."""
        if self.trainer.sanity_checking:
            return
        out = Path(self.trainer.default_root_dir) / "media"
        audio = getattr(self.trainer.datamodule, "audio", None) or {}
        suffix = f"_{name}_step{self.global_step}" if name else f"_step{self.global_step}"
        pictures, examples = write_evaluation_media(
            report.evaluator,
            report.media_images,
            out,
            suffix,
            sounds=report.media_sounds,
            sample_rate=audio.get("sample_rate"),
        )
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                prefix = val_prefix(name)
                log_media_to_wandb(logger, pictures, examples, self.global_step, prefix)

    @torch.no_grad()
    def generate(
        self, images: Tensor | None = None, memory: Tensor | None = None, **kwargs
    ) -> list[str]:
        """Captions for a batch of preprocessed images, or of their already encoded tokens,
        or (neither) continuations of `prefix` ids (strategy, num_beams, prefix ... as in
        `polymodal.models.generation.generate`)."""
        tok = self.tokenizer
        if memory is None and images is not None:
            memory = self.model.encode(self.model.decoder_memory, images.to(self.device))
        ids, _ = self.model.generate(
            memory,
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
