"""ITM negative mining, MLM masking, MIM and captioning losses against independent formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.evaluation.validation import ValidationReport
from polymodal.objectives.base import IGNORE_INDEX, EncodingCache
from polymodal.objectives.caption import next_token_loss
from polymodal.objectives.itm import same_pair_mask, sample_hard_negatives
from polymodal.objectives.mim import masked_patch_loss, patchify, random_keep
from polymodal.objectives.mlm import mask_tokens
from polymodal.tasks.pretrain import build_module
from polymodal.utils.errors import ConfigError
from tests.helpers import compose_train, random_batch


def test_hard_negatives_never_positive_or_same_id():
    """Duplicate captions and a shared image id: those pairs are never drawn."""
    captions = ["a red circle", "a blue star", "a red circle", "a green heart", "a blue star", "x"]
    image_ids = ["0", "1", "2", "3", "4", "3"]  # 3 and 5 show the same image
    same = same_pair_mask(image_ids, captions)
    assert same[0, 2] and same[1, 4] and same[3, 5] and same.diagonal().all()
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=gen) * 3
    for _ in range(300):
        index, valid = sample_hard_negatives(sim, same, generator=gen)
        assert valid.all()
        assert not same[torch.arange(6), index].any()


def test_hard_negatives_follow_similarity_softmax():
    same = torch.eye(3, dtype=torch.bool)
    sim = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_hard_negatives(sim, same, gen)[0][0] for _ in range(4000)])
    expected = np.exp(2) / (np.exp(2) + 1)  # column 1 vs column 2 for row 0
    assert abs((draws == 1).float().mean().item() - expected) < 0.03


def test_row_without_allowed_negative_is_invalid():
    same = torch.ones(2, 2, dtype=torch.bool)
    _, valid = sample_hard_negatives(torch.zeros(2, 2), same)
    assert not valid.any()


def test_mlm_masking_rates_and_specials():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (400, 20), generator=gen)
    ids[:, 0], ids[:, 15] = 2, 3  # BOS, EOS
    ids[:, 16:] = 0  # padding
    mask = ids != 0
    inputs, labels = mask_tokens(
        ids, mask, mask_id=4, special_ids=torch.arange(5), vocab_size=100, generator=gen
    )
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()  # BOS, EOS, padding
    assert chosen.any(dim=1).all()  # at least one per sequence
    rate = chosen[:, 1:15].float().mean().item()
    assert 0.14 < rate < 0.18  # 15% plus the one-per-sequence guarantee
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs[chosen] == 4).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03
    assert abs(kept - 0.1) < 0.03 + 0.01  # random replacements can hit the same id
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert not torch.isin(inputs[chosen], torch.arange(4)).any()  # no random special


def test_mlm_never_masks_specials_at_the_end_of_the_vocabulary():
    """GPT-2's <|endoftext|> (bos = eos = pad) is its last id, not one of the first."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 98, (200, 12), generator=gen)
    ids[:, 0], ids[:, 8:] = 99, 99  # bos, eos + padding
    mask = torch.arange(12) < 9
    inputs, labels = mask_tokens(
        ids, mask, mask_id=98, special_ids=torch.tensor([98, 99]), vocab_size=100, generator=gen
    )
    chosen = labels != IGNORE_INDEX
    assert chosen.any(dim=1).all() and not chosen[:, 0].any() and not chosen[:, 8].any()
    assert (inputs[chosen & (inputs != 98)] < 98).all()


def test_patchify_and_masking():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # patch 1 = rows 0-1, cols 2-3, channel-last inside the patch
    expected = images[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], expected)
    keep, masked = random_keep(5, 16, 0.75)
    assert keep.shape == (5, 4) and masked.sum(dim=1).eq(12).all()
    assert not masked.gather(1, keep).any()


def test_masked_patch_loss_ignores_visible_patches():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    masked = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    loss = masked_patch_loss(pred, target, masked)
    loss.backward()
    p, t, m = pred.detach().numpy(), target.numpy(), masked.numpy()
    ref = np.mean(
        [((p[b, n] - t[b, n]) ** 2).mean() for b in range(2) for n in range(6) if m[b, n]]
    )
    assert abs(loss.item() - ref) < 1e-12
    grad_ref = np.where(m[..., None], 2 * (p - t) / 5 / m.sum(), 0.0)
    np.testing.assert_allclose(pred.grad.numpy(), grad_ref, atol=1e-12)


def test_next_token_loss_matches_manual_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    mask = ids != 0
    logits = torch.randn(2, 4, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = next_token_loss(logits, ids, mask)
    loss.backward()
    lg = logits.detach().numpy()
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    terms = [(b, t) for b in range(2) for t in range(4) if mask[b, t + 1]]
    ref = -np.mean([logp[b, t, ids[b, t + 1]] for b, t in terms])
    assert abs(loss.item() - ref) < 1e-12
    grad = np.zeros_like(lg)
    for b, t in terms:
        grad[b, t] = np.exp(logp[b, t])
        grad[b, t, ids[b, t + 1]] -= 1
    np.testing.assert_allclose(logits.grad.numpy(), grad / len(terms), atol=1e-12)


def fail(**kwargs):
    raise AssertionError("no captions for a batch without the decoder's memory")


def test_objectives_skip_batches_without_their_modalities(tmp_path):
    """In a trimodal mix an audio-text batch trains contrastive audio-text alone (MIM and
    the image-captioning decoder need images); an image-text batch trains all three."""
    extra = [
        "+task.objectives.mim.weight=0.5",
        "+task.objectives.caption.weight=1",
        "+task.objectives.itm.weight=1",
    ]
    cfg = compose_train(["experiment=trimodal", *extra], tmp_path, tmp_path)
    module = build_module(cfg)
    text = {**random_batch(4, context_length=32), "meta": [{}] * 4, "text": ["a"] * 4}
    text["key"] = [f"k{i}" for i in range(4)]
    images = {**text, "image": torch.randn(4, 3, 64, 64)}
    sounds = {k: v for k, v in text.items() if k != "image"}
    sounds["audio"] = torch.randn(4, 1, 64, 100)  # log-mel spectrograms
    _, image_logs = module.step_losses(EncodingCache(module.model, images))
    _, audio_logs = module.step_losses(EncodingCache(module.model, sounds))
    assert {"itc/loss", "mim/loss", "caption/loss", "itm/loss"} <= set(image_logs)
    assert {k for k in audio_logs if k.endswith("loss")} == {"itc/loss"}
    # validation of the sounds set: scored against its texts, no ITM re-ranking or
    # captions (the fusion and the decoder attend to images)
    report = ValidationReport(media_samples=0)
    report.update(EncodingCache(module.model, sounds), 0, fail)
    assert len(report.evaluator.metas) == 4 and not report._tokens and not report.captions
    text_only = {k: v for k, v in sounds.items() if k != "audio"}
    with pytest.raises(ConfigError, match="holds none of the modalities"):
        module.step_losses(EncodingCache(module.model, text_only))


def test_caption_and_lm_train_one_decoder(tmp_path):
    """CoCa-style caption + LM on the same decoder: the LM loss is the next-token loss of
    the decoder attending to nothing, and only the caption loss reaches the cross-attention
    and the image tower; validation of the batch's texts reports exp(mean token NLL)."""
    cfg = compose_train(["experiment=coca", "+task.objectives.lm.weight=1"], tmp_path, tmp_path)
    module = build_module(cfg)
    batch = {**random_batch(6, image_size=64, context_length=32), "meta": [{}] * 6}
    batch |= {"text": ["a"] * 6, "key": [f"k{i}" for i in range(6)]}
    ids, mask = batch["text_ids"], batch["text_mask"]
    lm = module.objectives["lm"](EncodingCache(module.model, batch)).loss
    lm.backward()
    decoder = module.model.decoder
    expected = next_token_loss(decoder(ids[:, :-1], None, text_mask=mask[:, :-1]), ids, mask)
    torch.testing.assert_close(lm, expected)
    touched = {n for n, p in module.model.named_parameters() if p.grad is not None}
    assert any(n.startswith("decoder.blocks.0.attn") for n in touched)
    assert not any("cross_attn" in n or n.startswith("encoders.image") for n in touched)
    module.zero_grad()
    _, logs = module.step_losses(EncodingCache(module.model, batch))
    assert {"itc/loss", "caption/loss", "lm/loss"} <= set(logs)
    assert not torch.isclose(logs["caption/loss"], logs["lm/loss"])  # the image matters

    report = ValidationReport(media_samples=0, perplexity=True)
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    for index, half in enumerate(halves):
        report.update(EncodingCache(module.model, half), index)
    metrics = report.compute(module.model, lambda prompts: torch.zeros(len(prompts), 128))
    targets = ids[:, 1:][mask[:, 1:]]
    with torch.no_grad():
        logits = decoder(ids[:, :-1], None, text_mask=mask[:, :-1])[mask[:, 1:]]
    nll = torch.nn.functional.cross_entropy(logits, targets)  # mean over all tokens
    assert metrics["lm/perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_a_model_of_text_alone(tmp_path):
    """experiment=lm_shapes builds the decoder without cross-attention and no other tower;
    its validation reports perplexity and nothing that needs another modality; captioning
    such a model is one clear line."""
    cfg = compose_train(["experiment=lm_shapes"], tmp_path, tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == "val/lm/perplexity"  # auto, lowest
    assert cfg.callbacks.model_checkpoint.mode == "min"
    module = build_module(cfg)
    assert module.model.modalities == ["text"] and module.model.decoder_memory is None
    assert not any("cross_attn" in n for n, _ in module.model.named_parameters())
    batch = {**random_batch(4, context_length=32), "meta": [{}] * 4, "text": ["a"] * 4}
    del batch["image"]
    batch["key"] = [f"k{i}" for i in range(4)]
    _, logs = module.step_losses(EncodingCache(module.model, batch))
    assert set(logs) == {"lm/loss"}
    report = ValidationReport(media_samples=0, perplexity=True)
    report.update(EncodingCache(module.model, batch), 0, fail)
    metrics = report.compute(module.model, fail)
    assert set(metrics) == {"lm/nll", "lm/perplexity"}
    cfg = compose_train(["experiment=lm_shapes", "task=captioner"], tmp_path, tmp_path)
    module = build_module(cfg)
    with pytest.raises(ConfigError, match="holds only text"):
        module.step_losses(EncodingCache(module.model, batch))
