"""`model.micro_batch_size`: a batch encoded in checkpointed chunks has the loss and every
gradient of the whole batch (contrastive negatives included), while the forward pass keeps
only the chunks' outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from polymodal.objectives.base import EncodingCache
from polymodal.objectives.itc import ITCObjective
from polymodal.tasks.pretrain import build_module
from tests.helpers import compose_train, random_batch, tiny_model

SMALL = [  # the recipes' parts at depth 1, so that a batch of 128 stays quick
    "model.towers.image.depth=1",
    "model.towers.text.depth=1",
    "model.trunk.depth=1",
    "model.fusion.depth=1",
    "model.decoder.depth=1",
    "model.stems.image.conv_stem=false",  # BatchNorm would see each chunk's statistics
]


def loss_and_grads(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same masks and hard negatives for both
    loss, _ = module.step_losses(EncodingCache(module.model, batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("experiment", ["clip", "siglip", "albef", "coca", "mae"])
def test_four_micro_batches_of_32_equal_one_batch_of_128(tmp_path, experiment):
    """Loss and every parameter's gradient of 4 x 32 == 1 x 128 (atol 1e-5), for each
    recipe: the contrastive losses see all 128 x 128 pairs, ITM mines its negatives
    from them, and the caption, MLM and MIM losses cover the whole batch."""
    cfg = compose_train([f"experiment={experiment}", *SMALL], tmp_path, tmp_path)
    module = build_module(cfg)
    if "mlm" in module.objectives:  # the special ids of the tokenizer a run would pass
        module.objectives["mlm"].setup(SimpleNamespace(mask_id=4, special_ids=range(5)), {})
    batch = {**random_batch(128, image_size=64, context_length=32), "meta": [{}] * 128}
    batch |= {"text": [f"t{i % 7}" for i in range(128)], "key": [f"k{i}" for i in range(128)]}
    whole_loss, whole = loss_and_grads(module, batch)
    module.model.micro_batch_size = 32
    chunked_loss, chunked = loss_and_grads(module, batch)
    torch.testing.assert_close(chunked_loss, whole_loss, atol=1e-5, rtol=0)
    assert chunked.keys() == whole.keys()
    assert any(n.startswith("model.encoders.image") for n in whole)
    differ = [n for n in whole if not torch.allclose(chunked[n], whole[n], atol=1e-5, rtol=0)]
    assert not differ, f"gradients differ: {differ}"


def saved_bytes(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """The ITC loss and the bytes its forward pass keeps for the backward pass."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ITCObjective()(EncodingCache(model, batch)).loss
    return loss, total


def test_chunks_keep_only_their_outputs_and_count_batch_norm_once():
    """Checkpointed chunks store a fraction of the activations; the backward pass's
    recomputation leaves BatchNorm's running statistics as the forward pass set them
    (one update per chunk)."""
    torch.manual_seed(0)
    model = tiny_model(parts=("logit_scale",), depth=4)  # with the BatchNorm conv stem
    batch = random_batch(64)
    _, whole = saved_bytes(model, batch)
    model.micro_batch_size = 16
    loss, chunked = saved_bytes(model, batch)
    assert chunked < 0.25 * whole
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    after_forward = [b.clone() for m in norms for b in m.buffers()]
    assert norms[0].num_batches_tracked.item() == 1 + 4  # the unchunked pass, then 4 chunks
    loss.backward()
    after_backward = [b for m in norms for b in m.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(after_forward, after_backward, strict=True))
    model.eval()  # evaluation: chunks without checkpointing, the same embeddings
    with torch.no_grad():
        chunked = model.embed("image", batch["image"])
        model.micro_batch_size = None
        torch.testing.assert_close(chunked, model.embed("image", batch["image"]))
