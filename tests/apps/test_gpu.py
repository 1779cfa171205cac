"""GPU paths, run by `benchmarks/gpu_check.sh` on a lent CUDA machine (skipped without
one): bf16-mixed training, the fused AdamW kernel, FSDP on one GPU, NCCL DDP with one
process. Each is a short run of the training app on the shapes fixture."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.tasks.pretrain import PretrainModule
from polymodal.train import train
from tests.helpers import compose_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
RUN = ["debug=fdr", "trainer=gpu", "data.num_workers=2"]


def finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def test_bf16_mixed_run(tmp_path, shapes_dir):
    metrics = train(compose_train([*RUN, "trainer.precision=bf16-mixed"], tmp_path, shapes_dir))
    assert metrics["train/global_step"] == 1 and finite(metrics)


def test_fused_adamw_on_cuda(tmp_path, shapes_dir, monkeypatch):
    """fp32 on CUDA takes the fused AdamW kernel (task.optimizer.fused=null)."""
    made = []
    configure = PretrainModule.configure_optimizers
    monkeypatch.setattr(
        PretrainModule,
        "configure_optimizers",
        lambda self: made.append(configure(self)) or made[-1],
    )
    metrics = train(compose_train([*RUN, "trainer.precision=32-true"], tmp_path, shapes_dir))
    assert made[0]["optimizer"].defaults["fused"] is True and finite(metrics)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_one_gpu_strategy(strategy, tmp_path, shapes_dir):
    """FSDP sharding and NCCL DDP with one process (the code paths of many)."""
    overrides = ["debug=fdr", f"trainer={strategy}", "trainer.devices=1", "data.num_workers=2"]
    metrics = train(compose_train(overrides, tmp_path, shapes_dir))
    assert metrics["train/global_step"] == 1 and finite(metrics)
