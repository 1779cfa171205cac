"""CaptionDecoder (KV cache, masks) and generate(): cache == recompute, beam/greedy/sampling."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models.decoder import CaptionDecoder
from polymodal.models.generation import generate
from polymodal.tasks.optim import no_weight_decay_names

PAD, BOS, EOS = 0, 2, 3  # the tokenizer's ids
VOCAB, MEMORY_DIM, CONTEXT = 50, 24, 16


class BiasedDecoder(CaptionDecoder):
    """A random decoder plus fixed logit offsets: `bias` everywhere, `repeat` on the input token.

    `repeat` rewards predicting the token just fed, i.e. repeating; `bias[EOS]` sets how soon
    sequences end. Both act through forward(), so teacher forcing sees the same model.
    """

    def __init__(self, bias: Tensor, repeat: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("bias", bias)
        self.repeat = repeat

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        logits = super().forward(ids, *args, **kwargs)
        return logits + self.bias + self.repeat * F.one_hot(ids, self.bias.numel())


def make_decoder(
    seed: int = 0, vocab: int = VOCAB, eos_bias: float = 0.0, repeat: float = 0.0
) -> BiasedDecoder:
    torch.manual_seed(seed)
    bias = torch.zeros(vocab)
    bias[EOS] = eos_bias
    decoder = BiasedDecoder(
        bias,
        repeat,
        vocab_size=vocab,
        context_length=CONTEXT,
        width=32,
        depth=2,
        num_heads=4,
        memory_dim=MEMORY_DIM,
    )
    # Larger than the 0.02 init so the random model has clear preferences (fewer near-ties).
    nn.init.normal_(decoder.embed.token.weight, std=0.3)
    return decoder.eval()


def make_memory(batch: int, seed: int = 1) -> Tensor:
    return torch.randn(batch, 5, MEMORY_DIM, generator=torch.Generator().manual_seed(seed))


def gen(decoder: CaptionDecoder, memory: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    return generate(decoder, memory, bos_id=BOS, eos_id=EOS, pad_id=PAD, **kwargs)


def sequence_logprob(
    decoder: CaptionDecoder,
    ids: Tensor,
    memory: Tensor | None,
    memory_mask: Tensor | None = None,
    start: int = 1,
) -> Tensor:
    """Teacher-forced sum of log-probs of ids[:, start:] (after BOS, or after a prefix of
    `start` tokens) up to and including the first EOS."""
    targets = ids[:, 1:]
    is_eos = targets == EOS
    valid = (is_eos.cumsum(dim=1) - is_eos.long()) == 0
    text_mask = torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1)
    with torch.no_grad():
        logits = decoder(ids[:, :-1], memory, memory_mask=memory_mask, text_mask=text_mask)
    logprobs = logits.log_softmax(dim=-1).gather(-1, targets[..., None])[..., 0]
    counted = valid.clone()
    counted[:, : start - 1] = False
    return logprobs.where(counted, 0.0).sum(dim=1)


def cached_and_recomputed(decoder: CaptionDecoder, memory: Tensor | None, **kwargs):
    """Generate with the KV cache and by recomputing (same sampling seed); assert both give
    the same ids and log-probabilities, and return the cached ones."""
    (ids, logprob), (full_ids, full_logprob) = (
        gen(
            decoder,
            memory,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        for use_cache in (True, False)
    )
    assert torch.equal(ids, full_ids)
    torch.testing.assert_close(logprob, full_logprob, atol=1e-5, rtol=0)
    return ids, logprob


def test_cached_logits_match_full_prefix() -> None:
    decoder = make_decoder()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    memory = make_memory(3)
    memory_mask = torch.ones(3, 5, dtype=torch.bool)
    memory_mask[1, 3:] = False
    with torch.no_grad():
        full = decoder(ids, memory, memory_mask=memory_mask)
        cache = decoder.init_cache()
        # A prompt chunk, single tokens, then a chunk on top of cached keys (causal within it).
        chunks = [(0, 4), *((t, t + 1) for t in range(4, 8)), (8, 12)]
        cached = torch.cat(
            [decoder(ids[:, a:b], memory, memory_mask=memory_mask, cache=cache) for a, b in chunks],
            dim=1,
        )
    assert cache.length == 12
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_cache_reorder_selects_rows_of_all_layers() -> None:
    decoder = make_decoder()
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    memory = make_memory(3)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        full = decoder(ids[index], memory[index])
        cache = decoder.init_cache()
        decoder(ids[:, :5], memory, cache=cache)
        cache.reorder(index)
        # The reordered cached memory keys/values are used from now on, not this argument.
        continued = decoder(ids[index, 5:], memory, cache=cache)
    torch.testing.assert_close(continued, full[:, 5:], atol=1e-5, rtol=0)


SAMPLE_KWARGS = {"top_k": 20, "top_p": 0.9, "temperature": 0.8, "repetition_penalty": 1.3}


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [("greedy", {}), ("beam", {"num_beams": 4}), ("sample", SAMPLE_KWARGS)],
)
def test_cached_generation_matches_recompute(strategy: str, kwargs: dict) -> None:
    decoder = make_decoder(eos_bias=1.5)
    memory = make_memory(6)
    memory_mask = torch.ones(6, 5, dtype=torch.bool)
    memory_mask[::2, 4] = False
    cached_and_recomputed(
        decoder, memory, memory_mask=memory_mask, strategy=strategy, max_length=10, **kwargs
    )


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [
        ("greedy", {"min_length": 3, "repetition_penalty": 1.5}),
        ("beam", {"num_beams": 3, "min_length": 3, "repetition_penalty": 1.5}),
        ("sample", SAMPLE_KWARGS),
    ],
)
def test_returned_logprob_is_the_raw_model_logprob(strategy: str, kwargs: dict) -> None:
    decoder = make_decoder(eos_bias=1.5)
    memory = make_memory(6)
    ids, logprob = gen(
        decoder,
        memory,
        strategy=strategy,
        max_length=10,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    torch.testing.assert_close(logprob, sequence_logprob(decoder, ids, memory), atol=1e-5, rtol=0)


def test_beam_not_worse_than_greedy_when_greedy_path_stays_a_candidate() -> None:
    """Beam search is not better than greedy in general: the greedy prefix can drop out of the
    beam and the kept prefixes can continue worse. It is guaranteed when the greedy prefix is
    still a candidate at the last step, e.g. for two generated tokens (the greedy first token
    ranks first): the best two-token continuation of the beam then includes the greedy pair.
    Ranking by raw sum (length_penalty=0) with no EOS (min_length=max_length) keeps lengths equal.
    """
    decoder = make_decoder()
    memory = make_memory(8)
    common = {"max_length": 3, "min_length": 3, "length_penalty": 0.0}
    greedy_ids, _ = gen(decoder, memory, strategy="greedy", **common)
    beam_ids, _ = gen(decoder, memory, strategy="beam", num_beams=4, **common)
    assert greedy_ids.shape == beam_ids.shape == (8, 3)
    greedy = sequence_logprob(decoder, greedy_ids, memory)
    beam = sequence_logprob(decoder, beam_ids, memory)
    assert (beam >= greedy - 1e-5).all()


def test_beam_search_is_exact_when_beams_cover_all_prefixes() -> None:
    """With as many beams as prefixes, beam search is exhaustive: compare with brute force."""
    vocab, batch = 8, 3
    decoder = make_decoder(vocab=vocab)
    memory = make_memory(batch)
    common = {"max_length": 4, "min_length": 4, "length_penalty": 0.0}  # 3 tokens, no EOS
    tokens = [t for t in range(vocab) if t != EOS]
    beam_ids, beam_logprob = gen(
        decoder, memory, strategy="beam", num_beams=len(tokens) ** 2, **common
    )
    greedy_ids, _ = gen(decoder, memory, strategy="greedy", **common)
    candidates = torch.tensor(list(itertools.product(tokens, repeat=3)))
    candidates = torch.cat([torch.full((len(candidates), 1), BOS), candidates], dim=1)
    for i in range(batch):
        item_memory = memory[i : i + 1].expand(len(candidates), -1, -1)
        scores = sequence_logprob(decoder, candidates, item_memory)
        best = scores.argmax()
        assert torch.equal(beam_ids[i], candidates[best])
        torch.testing.assert_close(beam_logprob[i], scores[best], atol=1e-5, rtol=0)
        greedy = sequence_logprob(decoder, greedy_ids[i : i + 1], memory[i : i + 1])
        assert greedy <= scores[best] + 1e-5


def test_one_beam_is_greedy() -> None:
    """With length_penalty=0 a finished greedy hypothesis beats all its continuations."""
    decoder = make_decoder(eos_bias=7.0)
    memory = make_memory(6)
    greedy_ids, greedy_logprob = gen(decoder, memory, strategy="greedy", max_length=12)
    beam_ids, beam_logprob = gen(
        decoder, memory, strategy="beam", num_beams=1, length_penalty=0.0, max_length=12
    )
    assert (greedy_ids == EOS).any()
    assert torch.equal(beam_ids, greedy_ids)
    torch.testing.assert_close(beam_logprob, greedy_logprob)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_min_length_delays_eos(strategy: str) -> None:
    decoder = make_decoder(eos_bias=10.0)  # EOS is the top token everywhere
    memory = make_memory(4)
    # length_penalty=0: any token before EOS costs log-prob, so beam search also ends first.
    common = {"strategy": strategy, "max_length": 9, "length_penalty": 0.0}
    ids, _ = gen(decoder, memory, **common)
    assert ids.tolist() == [[BOS, EOS]] * 4
    ids, _ = gen(decoder, memory, min_length=5, **common)
    assert ids.shape == (4, 6)
    assert (ids[:, 5] == EOS).all() and not (ids[:, :5] == EOS).any()


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [("greedy", {}), ("beam", {"num_beams": 3}), ("sample", {"temperature": 1.5})],
)
def test_output_format(strategy: str, kwargs: dict) -> None:
    decoder = make_decoder(eos_bias=9.0)  # EOS likely enough that every strategy ends
    memory = make_memory(8)
    generator = torch.Generator().manual_seed(0)
    ids, logprob = gen(
        decoder,
        memory,
        strategy=strategy,
        max_length=10,
        min_length=3,
        generator=generator,
        **kwargs,
    )
    assert ids.shape[0] == 8 and ids.shape[1] <= 10 and logprob.shape == (8,)
    assert (ids[:, 0] == BOS).all()
    assert not (ids[:, :3] == EOS).any()
    is_eos = ids == EOS
    assert is_eos.any()  # some rows end early, so the padding check below is not vacuous
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    assert (ids[after_eos] == PAD).all()
    assert (is_eos.sum(dim=1) <= 1).all()

    ids, _ = gen(decoder, memory, strategy=strategy, max_length=7, min_length=7, **kwargs)
    assert ids.shape == (8, 7) and not (ids == EOS).any()


def test_repetition_penalty_reduces_repeats() -> None:
    # Random tied-embedding decoders already like to repeat their input; `repeat` adds to it.
    decoder = make_decoder(repeat=1.0)

    def repeats(penalty: float) -> int:
        """Generated tokens (of 6 x 11) that already occurred earlier in their sequence."""
        ids, _ = gen(
            decoder, make_memory(6), max_length=12, min_length=12, repetition_penalty=penalty
        )
        generated = ids[:, 1:]
        seen_before = (generated[:, :, None] == generated[:, None, :]).tril(diagonal=-1)
        return int(seen_before.any(dim=2).sum())

    baseline = repeats(1.0)
    assert baseline >= 50
    assert repeats(2.0) < baseline
    assert repeats(5.0) <= baseline // 4


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    decoder = make_decoder(eos_bias=1.5)
    memory = make_memory(6)
    greedy_ids, _ = gen(decoder, memory, max_length=10)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        ids, _ = gen(
            decoder,
            memory,
            strategy="sample",
            max_length=10,
            temperature=0.7,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        assert torch.equal(ids, greedy_ids)


def test_sampling_is_seeded() -> None:
    decoder = make_decoder()
    memory = make_memory(6)

    def sample(seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return gen(decoder, memory, strategy="sample", max_length=10, generator=generator)[0]

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_text_mask_padding() -> None:
    """Right padding: no NaNs anywhere, and real positions ignore what the padding holds."""
    decoder = make_decoder()
    memory = make_memory(3)
    lengths = torch.tensor([8, 5, 1])
    text_mask = torch.arange(8)[None] < lengths[:, None]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 8), generator=generator)
    other = torch.where(text_mask, ids, torch.randint(0, VOCAB, (3, 8), generator=generator))
    with torch.no_grad():
        logits = decoder(ids, memory, text_mask=text_mask)
        other_logits = decoder(other, memory, text_mask=text_mask)
        unmasked = decoder(ids, memory)
    assert logits.isfinite().all() and other_logits.isfinite().all()
    torch.testing.assert_close(logits[text_mask], other_logits[text_mask])
    torch.testing.assert_close(logits[text_mask], unmasked[text_mask], atol=1e-5, rtol=0)


def test_captioning_loss_trains_decoder_and_memory() -> None:
    torch.manual_seed(0)
    decoder = CaptionDecoder(VOCAB, context_length=CONTEXT, width=32, num_heads=4, memory_dim=24)
    memory = make_memory(4).requires_grad_()
    ids = torch.randint(4, VOCAB, (4, 9))
    ids[:, 0] = BOS
    ids[1, 5:] = PAD
    text_mask = ids != PAD
    logits = decoder(ids[:, :-1], memory, text_mask=text_mask[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)
    loss.backward()
    assert memory.grad is not None and memory.grad.isfinite().all()
    assert memory.grad.abs().sum() > 0
    for name, param in decoder.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
    assert {"embed.position", "embed.token.weight"} <= no_weight_decay_names(decoder)


def test_context_length_errors() -> None:
    decoder = make_decoder()
    memory = make_memory(2)
    with pytest.raises(ValueError, match="context_length"):
        decoder(torch.zeros(2, CONTEXT + 1, dtype=torch.long), memory)
    cache = decoder.init_cache()
    decoder(torch.zeros(2, 10, dtype=torch.long), memory, cache=cache)
    with pytest.raises(ValueError, match="context_length"):
        decoder(torch.zeros(2, 7, dtype=torch.long), memory, cache=cache)
    with pytest.raises(ValueError, match="text_mask"):
        decoder(torch.zeros(2, 1, dtype=torch.long), memory, text_mask=torch.ones(2, 1).bool(),
                cache=cache)  # fmt: skip
    with pytest.raises(ValueError, match="max_length"):
        gen(decoder, memory, max_length=CONTEXT + 2)
    ids, _ = gen(decoder, memory, max_length=CONTEXT + 1, min_length=CONTEXT + 1)
    assert ids.shape == (2, CONTEXT + 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "nucleus"}, "strategy"),
        ({"strategy": "beam", "num_beams": 0}, "num_beams"),
        ({"strategy": "sample", "top_p": 0.0}, "top_p"),
        ({"strategy": "sample", "top_p": 1.5}, "top_p"),
        ({"strategy": "sample", "top_k": -1}, "top_k"),
        ({"strategy": "sample", "temperature": 0.0}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_length": 1}, "max_length"),
        ({"min_length": 30}, "min_length"),
        ({"eos_id": VOCAB}, "eos_id"),
    ],
)
def test_invalid_generation_arguments(kwargs: dict, match: str) -> None:
    decoder = make_decoder()
    arguments = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(decoder, make_memory(2), **arguments)


def make_prefix(batch: int, length: int, vocab: int = VOCAB, seed: int = 2) -> Tensor:
    """BOS and `length - 1` random tokens that are none of the special ids."""
    tokens = torch.randint(
        5, vocab, (batch, length - 1), generator=torch.Generator().manual_seed(seed)
    )
    return torch.cat([torch.full((batch, 1), BOS), tokens], dim=1)


def make_language_model(seed: int = 0, vocab: int = VOCAB) -> CaptionDecoder:
    """A decoder without cross-attention (memory_dim=None), as the lm objective trains."""
    torch.manual_seed(seed)
    decoder = CaptionDecoder(
        vocab_size=vocab, context_length=CONTEXT, width=32, depth=2, num_heads=4, memory_dim=None
    )
    nn.init.normal_(decoder.embed.token.weight, std=0.3)
    return decoder.eval()


def test_a_decoder_without_memory_has_no_cross_attention() -> None:
    decoder = make_language_model()
    assert not any("cross_attn" in name for name, _ in decoder.named_parameters())
    ids = make_prefix(2, 4)
    assert decoder(ids, None).shape == (2, 4, VOCAB)
    with pytest.raises(ValueError, match="no cross-attention"):
        decoder(ids, make_memory(2))


@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [("greedy", {}), ("beam", {"num_beams": 3}), ("sample", SAMPLE_KWARGS)],
)
def test_generation_continues_a_prefix(with_memory: bool, strategy: str, kwargs: dict) -> None:
    """The output starts with the prompt; the KV cache (prompt fed at once, then one token a
    step) gives the recomputed tokens; the log-probability counts the continuation only."""
    decoder = make_decoder(eos_bias=1.0) if with_memory else make_language_model()
    memory = make_memory(5) if with_memory else None
    prefix = make_prefix(5, 4)
    ids, logprob = cached_and_recomputed(
        decoder, memory, prefix=prefix, strategy=strategy, max_length=12, **kwargs
    )
    assert torch.equal(ids[:, :4], prefix) and ids.shape[1] > 4
    expected = sequence_logprob(decoder, ids, memory, start=4)
    torch.testing.assert_close(logprob, expected, atol=1e-5, rtol=0)


def test_beam_search_from_a_prefix_is_exact_when_beams_cover_all_continuations() -> None:
    """Length bookkeeping after a prompt: exhaustive beams find the brute-force best
    continuation of a language model (two tokens after a 3-token prompt, no EOS)."""
    vocab = 8
    decoder = make_language_model(vocab=vocab)
    prefix = make_prefix(3, 3, vocab=vocab)
    common = {"max_length": 5, "min_length": 5, "length_penalty": 0.0}
    tokens = [t for t in range(vocab) if t != EOS]
    beam_ids, beam_logprob = gen(
        decoder, None, prefix=prefix, strategy="beam", num_beams=len(tokens), **common
    )
    pairs = torch.tensor(list(itertools.product(tokens, repeat=2)))
    for i in range(len(prefix)):
        candidates = torch.cat([prefix[i].expand(len(pairs), -1), pairs], dim=1)
        scores = sequence_logprob(decoder, candidates, None, start=3)
        assert torch.equal(beam_ids[i], candidates[scores.argmax()])
        torch.testing.assert_close(beam_logprob[i], scores.max(), atol=1e-5, rtol=0)


def test_beam_search_from_a_prefix_scores_lengths_after_the_prefix() -> None:
    """With a length penalty and EOS allowed, exhaustive beams find the brute-force best of
    every continuation of up to 3 tokens after a 3-token prompt, scored by its log-prob
    over its generated tokens (EOS included) ** length_penalty."""
    vocab, start, new = 8, 3, 3
    decoder = make_decoder(vocab=vocab, eos_bias=1.5)  # some end early, not all
    prefix = make_prefix(12, start, vocab=vocab)
    memory = make_memory(12)
    beams = (vocab - 1) ** 2
    beam_ids, _ = gen(
        decoder, memory, prefix=prefix, strategy="beam", num_beams=beams, max_length=start + new
    )
    tokens = [t for t in range(vocab) if t != EOS]
    endings = [[EOS, PAD, PAD]] + [[a, EOS, PAD] for a in tokens]
    endings += [[a, b, EOS] for a in tokens for b in tokens]
    endings += [list(c) for c in itertools.product(tokens, repeat=3)]  # cut at max_length
    endings = torch.tensor(endings)
    lengths = torch.where(endings == EOS, torch.arange(1, 4), 3).min(dim=1).values
    for i in range(len(prefix)):
        candidates = torch.cat([prefix[i].expand(len(endings), -1), endings], dim=1)
        item_memory = memory[i : i + 1].expand(len(endings), -1, -1)
        scores = sequence_logprob(decoder, candidates, item_memory, start=start) / lengths
        best = candidates[scores.argmax()][: start + int(lengths[scores.argmax()])]
        assert torch.equal(beam_ids[i, : len(best)], best)
        assert (beam_ids[i, len(best) :] == PAD).all()


@pytest.mark.parametrize(
    ("memory", "prefix", "match"),
    [
        (None, None, "needs a prefix"),
        (None, torch.tensor([[5, 6]]), "starting with bos_id"),
        (None, torch.tensor([[BOS, VOCAB]]), "outside the vocabulary"),
        (make_memory(2), make_prefix(3, 2), "3 prefixes for 2 memories"),
    ],
)
def test_invalid_prefixes(memory: Tensor | None, prefix: Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gen(make_decoder(), memory, prefix=prefix)


def test_a_prefix_leaves_room_to_generate() -> None:
    with pytest.raises(ValueError, match="prefix length"):
        gen(make_language_model(), None, prefix=make_prefix(1, 12), max_length=12)
