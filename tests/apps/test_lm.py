"""A GPT-style language model of shapes captions (experiment=lm_shapes): it learns the
captions (held-out perplexity far below a unigram model's), its logged perplexity is the
plain formula's, and `polymodal.load(ckpt).complete` continues prompts into captions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import polymodal
from polymodal.data.shapes import parse_caption, write_shapes
from polymodal.data.shards import TEXT_KEYS
from polymodal.data.shardtools import captions
from polymodal.train import train
from tests.helpers import compose_train


@pytest.fixture(scope="module")
def language_model(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, shapes dir) of a short lm_shapes run on a small shapes dataset."""
    data = tmp_path_factory.mktemp("lm_shapes_data")
    write_shapes(data, num_train=4096, num_val=256, num_test=16, shard_size=1024, seed=1)
    out = tmp_path_factory.mktemp("lm_run")
    overrides = [
        "experiment=lm_shapes",
        "logger=csv",
        "callbacks=default",
        "trainer.max_steps=150",
        "trainer.val_check_interval=150",
        "data.batch_size=64",
        "data.num_workers=1",
        "task.scheduler.warmup_steps=20",
        "~callbacks.rich_progress_bar",
    ]
    train(compose_train(overrides, out, data))
    return out, data


def token_counts(model: polymodal.Polymodal, texts: list[str]) -> torch.Tensor:
    ids, mask = model.tokenizer.encode(texts)
    return torch.bincount(ids[:, 1:][mask[:, 1:]], minlength=model.tokenizer.vocab_size)


def test_held_out_perplexity_is_far_below_a_unigram_models(language_model) -> None:
    out, data = language_model
    model = polymodal.load(out / "checkpoints" / "last.ckpt")
    train_texts = list(captions(sorted(map(str, (data / "train").glob("*.tar"))), TEXT_KEYS))
    val_texts = list(captions(sorted(map(str, (data / "val").glob("*.tar"))), TEXT_KEYS))
    # the unigram model of the train tokens (add-one), scored on the val tokens
    counts = token_counts(model, train_texts).double() + 1
    val_counts = token_counts(model, val_texts).double()
    unigram = math.exp(-(val_counts * (counts / counts.sum()).log()).sum() / val_counts.sum())
    # the checkpoint's perplexity by the plain formula: exp(mean NLL of every val token)
    ids, mask = model.tokenizer.encode(val_texts)
    with torch.no_grad():
        logits = model.module.model.decode(ids[:, :-1], None, text_mask=mask[:, :-1])
    nll = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
    perplexity = float(nll.exp())
    logged = json.loads((out / "metrics.json").read_text())
    assert logged["val/lm/perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert perplexity < 0.25 * unigram, (perplexity, unigram)


def test_completions_continue_prompts_into_captions(language_model) -> None:
    out, data = language_model
    model = polymodal.load(out / "checkpoints" / "last.ckpt")
    val_texts = list(captions(sorted(map(str, (data / "val").glob("*.tar"))), TEXT_KEYS))
    prompts = [" ".join(text.split()[:2]) for text in val_texts[:40]]
    completed = model.complete(prompts, max_length=32)
    assert all(text.startswith(prompt) for text, prompt in zip(completed, prompts, strict=True))
    # prompts of several token lengths decode in groups; each as if decoded alone
    assert [model.complete([p], max_length=32)[0] for p in prompts[:6]] == completed[:6]
    parsed = sum(parse_caption(text) is not None for text in completed) / len(completed)
    assert parsed >= 0.9, completed[:10]
    # sampled completions (top-k 5, temperature 0.7): still captions, and varied
    torch.manual_seed(0)
    sampled = model.complete(prompts, max_length=32, strategy="sample", top_k=5, temperature=0.7)
    assert all(text.startswith(prompt) for text, prompt in zip(sampled, prompts, strict=True))
    assert sum(parse_caption(text) is not None for text in sampled) >= 0.7 * len(sampled)
    assert len(set(sampled)) >= len(set(prompts)) + 5, sampled  # not one per prompt
