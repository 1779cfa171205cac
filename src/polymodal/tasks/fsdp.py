"""FSDP for polymodal's models: the Lightning strategy (also on CPU) and its wrap policy.

Here rather than in utils/distributed.py because the wrap policy names the model's block
classes (utils imports no other polymodal package). `conf/trainer/fsdp.yaml` targets both.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from polymodal.models.model import BLOCK_CLASSES


def transformer_block_classes() -> set[type[nn.Module]]:
    """The block classes FSDP wraps one by one: ours and timm's ViT block."""
    return set(BLOCK_CLASSES)


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDPStrategy, also on CPU (gloo), and reusable after fit.

    - torch's FSDP shards and trains over gloo when given `device_id=cpu`, but Lightning
      refuses `accelerator=cpu` for its registered FSDP strategy and passes no CPU device
      id; this subclass wraps the model itself on CPU, so `trainer=fsdp
      trainer.accelerator=cpu` runs a sharded model on a laptop or in CI.
    - After fit, `trainer.validate` hands the strategy the bare LightningModule, whose
      root-level weights now live in the old root wrapper's flat parameter; Lightning
      would run it unwrapped (and crash on the flattened weights). The root wrapper of
      the same module is reused instead.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._root: FullyShardedDataParallel | None = None

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self._root is not None and self._root.module is model:
            return self._root
        wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.root_device.type == "cpu" and not wrapped:
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied; Lightning would warn
        model = super()._setup_model(model)
        if isinstance(model, FullyShardedDataParallel):
            self._root = model
        return model
