"""Caption generation from a `CaptionDecoder`: greedy, beam search, top-k / top-p sampling.

Conventions shared by every strategy:

- Outputs start with `bos_id`, or with the given `prefix` (a prompt: BOS and its tokens, the
  same length in every row), and continue it. `max_length` counts BOS, the prefix and EOS, so
  at most `max_length - P` tokens are generated after a prefix of P tokens (P = 1: BOS). After
  EOS a row is filled with `pad_id`; the output has T columns, T <= max_length (generation
  stops once every row has finished).
- EOS is forbidden while a sequence, BOS and prefix included, is shorter than `min_length`
  (Hugging Face convention): EOS can first appear at index `min_length`, and
  `min_length=max_length` means no EOS at all.
- The returned log-probability is the sum, over generated tokens after the prefix (EOS
  included when generated, padding excluded), of `log_softmax` of the *raw* logits: no
  temperature, penalty or masking. It is what a teacher-forced forward pass gives for the
  returned ids.
- `repetition_penalty` (CTRL / HF): logits of tokens already in the sequence (BOS excluded,
  the prefix included) are divided by the penalty when positive and multiplied by it when
  negative. It applies to all strategies; `temperature`, `top_k` and `top_p` only to "sample".
- `memory=None` generates from the decoder alone (a text-only language model); then a
  `prefix` gives the batch size.
- Nothing stops the model from emitting `pad_id` or `bos_id` itself; a trained one does not.

Beam search follows Hugging Face: active beams are ranked by their summed (penalised, masked)
log-probability; an EOS among the top `num_beams` candidates finishes a hypothesis, scored
`sum_logprob / length**length_penalty` with `length` = generated tokens (after the prefix)
including EOS; each item keeps its `num_beams` best finished hypotheses. Search stops when no
active beam can beat the worst kept hypothesis (exact bound: log-probs are <= 0, so sums only
decrease) or at `max_length`, where the unfinished beams join the pool; the best-scoring
hypothesis is returned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polymodal.models.decoder import CaptionDecoder, KVCache

STRATEGIES = ("greedy", "beam", "sample")


@torch.no_grad()
def generate(
    decoder: CaptionDecoder,
    memory: Tensor | None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    strategy: str = "greedy",
    max_length: int = 20,
    min_length: int = 1,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    memory_mask: Tensor | None = None,
    prefix: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token ids [N, T] (BOS or `prefix` first, pad after EOS) and their log-probabilities [N].

    `memory` [N, M, memory_dim] (optional `memory_mask` [N, M], True = valid) is what the
    decoder cross-attends to, None for none. `prefix` [N, P] (BOS first) is continued.
    `use_cache=False` recomputes the whole sequence every step; it is the slow reference the
    KV-cached path must match. See the module docstring for conventions.
    """
    vocab_size = decoder.embed.token.num_embeddings
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown generation strategy {strategy!r}; expected one of {STRATEGIES}")
    if memory is None and memory_mask is not None:
        raise ValueError("memory_mask without a memory")
    if memory is not None and memory.ndim != 3:
        raise ValueError(f"memory must be [N, M, dim], got shape {tuple(memory.shape)}")
    if prefix is None:
        if memory is None:
            raise ValueError("generation without memory needs a prefix (the batch's prompts)")
        prefix = torch.full((memory.shape[0], 1), bos_id, dtype=torch.long, device=memory.device)
    if prefix.ndim != 2 or not prefix.shape[1] or (prefix[:, 0] != bos_id).any():
        raise ValueError(f"prefix must be [N, P >= 1] ids starting with bos_id={bos_id}")
    if memory is not None and memory.shape[0] != prefix.shape[0]:
        raise ValueError(f"{prefix.shape[0]} prefixes for {memory.shape[0]} memories")
    if ((prefix < 0) | (prefix >= vocab_size)).any():
        raise ValueError(f"prefix holds ids outside the vocabulary [0, {vocab_size})")
    for name, token in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name}={token} is outside the vocabulary [0, {vocab_size})")
    if not prefix.shape[1] < max_length <= decoder.context_length + 1:
        # The last token is never fed back, so the decoder sees at most max_length - 1 tokens.
        raise ValueError(
            f"max_length must be in [prefix length + 1 = {prefix.shape[1] + 1}, "
            f"context_length + 1 = {decoder.context_length + 1}], got {max_length}"
        )
    if not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if repetition_penalty <= 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")

    if strategy == "beam":
        return _beam_search(
            decoder,
            memory,
            memory_mask,
            prefix,
            eos_id=eos_id,
            pad_id=pad_id,
            max_length=max_length,
            min_length=min_length,
            num_beams=num_beams,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            use_cache=use_cache,
        )
    return _greedy_or_sample(
        decoder,
        memory,
        memory_mask,
        prefix,
        eos_id=eos_id,
        pad_id=pad_id,
        sample=strategy == "sample",
        max_length=max_length,
        min_length=min_length,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        use_cache=use_cache,
        generator=generator,
    )


def _next_logits(
    decoder: CaptionDecoder,
    ids: Tensor,
    memory: Tensor | None,
    memory_mask: Tensor | None,
    cache: KVCache | None,
) -> Tensor:
    """Float logits [N, vocab] for the token after `ids`; with a cache only uncached ids are fed."""
    new = ids if cache is None else ids[:, cache.length :]
    return decoder(new, memory, memory_mask=memory_mask, cache=cache)[:, -1].float()


def _penalize_repetition(logits: Tensor, ids: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on the tokens of the sequence so far (BOS excluded, a prefix included)."""
    generated = ids[:, 1:]
    if penalty == 1.0 or not generated.shape[1]:
        return logits
    picked = logits.gather(1, generated)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, generated, picked)


def _forbid_eos(scores: Tensor, ids: Tensor, eos_id: int, min_length: int) -> Tensor:
    """Mask EOS (logits or log-probs) while the sequence is shorter than `min_length`."""
    if ids.shape[1] >= min_length:
        return scores
    scores = scores.clone()
    scores[:, eos_id] = -math.inf
    return scores


def _filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask all but the top_k tokens and the smallest set of tokens holding top_p of the mass."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens ranked above it already hold top_p; the top one stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _greedy_or_sample(
    decoder: CaptionDecoder,
    memory: Tensor | None,
    memory_mask: Tensor | None,
    prefix: Tensor,
    *,
    eos_id: int,
    pad_id: int,
    sample: bool,
    max_length: int,
    min_length: int,
    top_k: int,
    top_p: float,
    temperature: float,
    repetition_penalty: float,
    use_cache: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    batch, device = prefix.shape[0], prefix.device
    ids = prefix
    logprob = torch.zeros(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = decoder.init_cache() if use_cache else None
    while ids.shape[1] < max_length:
        logits = _next_logits(decoder, ids, memory, memory_mask, cache)
        raw_logprobs = logits.log_softmax(dim=-1)
        logits = _penalize_repetition(logits, ids, repetition_penalty)
        logits = _forbid_eos(logits, ids, eos_id, min_length)
        if sample:
            logits = _filter_top_k_top_p(logits / temperature, top_k, top_p)
            # Every row draws, finished or not, so the RNG stream does not depend on `done`.
            token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(dim=-1)
        token = token.masked_fill(done, pad_id)
        step_logprob = raw_logprobs.gather(1, token[:, None])[:, 0]
        logprob += step_logprob.masked_fill(done, 0.0)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == eos_id
        if done.all():
            break
    return ids, logprob


def _beam_search(
    decoder: CaptionDecoder,
    memory: Tensor | None,
    memory_mask: Tensor | None,
    prefix: Tensor,
    *,
    eos_id: int,
    pad_id: int,
    max_length: int,
    min_length: int,
    num_beams: int,
    length_penalty: float,
    repetition_penalty: float,
    use_cache: bool,
) -> tuple[Tensor, Tensor]:
    (batch, start), device = prefix.shape, prefix.device
    beams = num_beams
    if memory is not None:
        memory = memory.repeat_interleave(beams, dim=0)
    if memory_mask is not None:
        memory_mask = memory_mask.repeat_interleave(beams, dim=0)
    items = torch.arange(batch, device=device)[:, None]
    offsets = items * beams  # first row of each item in the flattened beams
    # Active beams, flattened [batch * beams, t]. All start as the prefix; only the first may
    # expand at the first step, otherwise the same continuation would fill every beam.
    ids = prefix.repeat_interleave(beams, dim=0)
    # generated tokens (EOS included) of a sequence of t columns: t - offset
    offset = start - 1
    search_scores = torch.zeros(batch, beams, device=device)
    search_scores[:, 1:] = -math.inf
    raw_scores = torch.zeros(batch, beams, device=device)
    # The best `beams` finished hypotheses per item, sorted by score (-inf = empty slot).
    pool_ids = torch.full((batch, beams, max_length), pad_id, dtype=torch.long, device=device)
    pool_scores = torch.full((batch, beams), -math.inf, device=device)
    pool_raw = torch.zeros(batch, beams, device=device)
    pool_lengths = torch.full((batch, beams), start, dtype=torch.long, device=device)
    cache = decoder.init_cache() if use_cache else None

    while ids.shape[1] < max_length:
        length = ids.shape[1]  # columns so far; a new EOS makes `length - offset` generated
        logits = _next_logits(decoder, ids, memory, memory_mask, cache)
        raw_logprobs = logits.log_softmax(dim=-1)
        # EOS is masked after log_softmax (as in HF): without a repetition penalty the search
        # then ranks by the raw log-probs instead of ones renormalised without EOS.
        search_logprobs = _penalize_repetition(logits, ids, repetition_penalty).log_softmax(dim=-1)
        search_logprobs = _forbid_eos(search_logprobs, ids, eos_id, min_length)
        vocab = logits.shape[-1]

        # 2 * beams candidates: at most `beams` end in EOS, so `beams` others remain active.
        candidates = (search_scores.view(-1, 1) + search_logprobs).view(batch, beams * vocab)
        cand_scores, cand_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
        rows = offsets + cand_index // vocab  # [batch, 2 * beams] rows into `ids`
        tokens = cand_index % vocab
        cand_raw = raw_scores.view(-1)[rows] + raw_logprobs[rows, tokens]
        is_eos = tokens == eos_id
        rank = torch.arange(cand_scores.shape[1], device=device).expand_as(cand_scores)

        # Finished hypotheses: EOS among the top `beams` candidates, merged into the pool.
        finishes = is_eos & (rank < beams) & cand_scores.isfinite()
        new_scores = torch.where(
            finishes, cand_scores / (length - offset) ** length_penalty, -math.inf
        )
        new_ids = torch.cat(
            [
                ids[rows],
                torch.full_like(tokens, eos_id)[..., None],
                tokens.new_full((batch, tokens.shape[1], max_length - length - 1), pad_id),
            ],
            dim=2,
        )
        pool_scores, slots = torch.cat([pool_scores, new_scores], dim=1).topk(beams, dim=1)
        pool_ids = torch.cat([pool_ids, new_ids], dim=1)[items, slots]
        pool_raw = torch.cat([pool_raw, cand_raw], dim=1).gather(1, slots)
        new_lengths = torch.full_like(tokens, length + 1)
        pool_lengths = torch.cat([pool_lengths, new_lengths], dim=1).gather(1, slots)

        # Active beams: the best `beams` non-EOS candidates, in rank order.
        keep = (rank + is_eos * cand_scores.shape[1]).argsort(dim=1)[:, :beams]
        search_scores = cand_scores.gather(1, keep)
        raw_scores = cand_raw.gather(1, keep)
        rows = rows.gather(1, keep).view(-1)
        ids = torch.cat([ids[rows], tokens.gather(1, keep).view(-1, 1)], dim=1)
        if cache is not None:
            cache.reorder(rows)

        if ids.shape[1] < max_length and _beams_cannot_improve(
            search_scores, pool_scores, ids.shape[1] - offset, max_length - offset, length_penalty
        ):
            break
    else:
        # Reached max_length: unfinished beams compete with the finished hypotheses.
        scores = search_scores / (max_length - start) ** length_penalty
        pool_scores = torch.cat([pool_scores, scores], dim=1)
        pool_ids = torch.cat([pool_ids, ids.view(batch, beams, max_length)], dim=1)
        pool_raw = torch.cat([pool_raw, raw_scores], dim=1)
        pool_lengths = torch.cat([pool_lengths, torch.full_like(pool_lengths, max_length)], dim=1)

    best = pool_scores.argmax(dim=1, keepdim=True)
    out_length = int(pool_lengths.gather(1, best).max())
    out_ids = pool_ids[items[:, 0], best[:, 0], :out_length]
    return out_ids, pool_raw.gather(1, best)[:, 0]


def _beams_cannot_improve(
    search_scores: Tensor,
    pool_scores: Tensor,
    length: int,
    max_length: int,
    length_penalty: float,
) -> bool:
    """Whether every item has a full pool that no continuation of its active beams can enter.

    A beam with summed log-prob s (<= 0, and only decreasing) that ends with n generated tokens,
    n in [length, max_length - 1], scores at most s / n**length_penalty; that bound is monotone
    in n, so its maximum is at one of the two ends.
    """
    bound = torch.maximum(
        search_scores / length**length_penalty,
        search_scores / (max_length - 1) ** length_penalty,
    ).amax(dim=1)
    worst = pool_scores[:, -1]
    return bool((worst.isfinite() & (bound <= worst)).all())
