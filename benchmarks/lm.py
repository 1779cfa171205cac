"""A text language model (experiment=lm_shapes) against a unigram baseline, and its completions.

    python benchmarks/lm.py logs/train/runs/<time>/checkpoints/best-step600.ckpt [--prompts 500]

Prints the val perplexity of the model and of a unigram model of the train captions (the
same tokenizer, add-one smoothing; both count every real token after BOS, EOS included),
then how many completions of held-out prompts (the first `--words` words of the first
`--prompts` val captions) parse as captions the shapes generator could have written
(`polymodal.data.shapes.parse_caption`), greedy and sampled, and how many are new (not a
train caption).
"""

from __future__ import annotations

import argparse
import math

import torch

import polymodal
from polymodal.data.shapes import parse_caption
from polymodal.data.shards import TEXT_KEYS, expand_shards
from polymodal.data.shardtools import captions
from polymodal.objectives.lm import token_nll

SAMPLING = {
    "greedy": {"strategy": "greedy"},
    "sample, T 1.0": {"strategy": "sample", "temperature": 1.0},
    "top-k 5, T 0.7": {"strategy": "sample", "top_k": 5, "temperature": 0.7},
}


def token_rows(model: polymodal.Polymodal, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = model.tokenizer.encode(texts)
    return ids.to(model.device), mask.to(model.device)


@torch.no_grad()
def model_nll(model: polymodal.Polymodal, texts: list[str], batch: int = 256) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(texts), batch):
        ids, mask = token_rows(model, texts[start : start + batch])
        logits = model.module.model.decode(ids[:, :-1], None, text_mask=mask[:, :-1])
        nll, tokens = token_nll(logits, ids, mask)
        total, count = total + float(nll), count + int(tokens)
    return total, count


def unigram_nll(model: polymodal.Polymodal, train: list[str], val: list[str]) -> tuple[float, int]:
    """NLL of the val tokens under train token frequencies (add-one over the vocabulary)."""
    vocab = model.tokenizer.vocab_size
    counts = torch.ones(vocab, dtype=torch.float64)
    for start in range(0, len(train), 4096):
        ids, mask = token_rows(model, train[start : start + 4096])
        counts += torch.bincount(ids[:, 1:][mask[:, 1:]].cpu(), minlength=vocab)
    logp = (counts / counts.sum()).log()
    ids, mask = token_rows(model, val)
    targets = ids[:, 1:][mask[:, 1:]].cpu()
    return float(-logp[targets].sum()), len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument(
        "--words", type=int, default=2, help="words of a val caption to prompt with"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = polymodal.load(args.ckpt)
    data = model.config["data"]
    train = list(captions(expand_shards(data["train_shards"], "data.train_shards"), TEXT_KEYS))
    val = list(captions(expand_shards(data["val_shards"], "data.val_shards"), TEXT_KEYS))
    print(f"{len(train)} train captions, {len(val)} val captions")
    print(f"{'model':<28} {'val perplexity':>15}")
    for name, (nll, count) in (
        ("unigram of train", unigram_nll(model, train, val)),
        ("checkpoint", model_nll(model, val)),
    ):
        print(f"{name:<28} {math.exp(nll / count):>15.3f}")

    prompts = [" ".join(c.split()[: args.words]) for c in val[: args.prompts]]
    seen = set(train)
    print(f"\n{len(prompts)} prompts of {args.words} val words, e.g. {prompts[:3]}")
    print(f"{'completion':<20} {'parse':>7} {'new':>7}  example")
    for name, kwargs in SAMPLING.items():
        torch.manual_seed(args.seed)
        texts = model.complete(prompts, max_length=model.tokenizer.context_length, **kwargs)
        parsed = sum(parse_caption(t) is not None for t in texts) / len(texts)
        new = sum(t not in seen for t in texts) / len(texts)
        print(f"{name:<20} {parsed:>7.3f} {new:>7.3f}  {texts[0]!r}")


if __name__ == "__main__":
    main()
