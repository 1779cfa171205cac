"""Zero-shot classes given as several wordings: the class embedding is the ensemble of
every (wording, template) prompt, an independent computation by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.evaluation.zeroshot import build_zeroshot_classifier, zeroshot_tasks
from polymodal.utils.errors import ConfigError


def fake_encoder(prompts: list[str]) -> torch.Tensor:
    """A fixed random vector per prompt string (so values can be recomputed by hand)."""
    rows = []
    for prompt in prompts:
        gen = torch.Generator().manual_seed(sum(map(ord, prompt)) * 31 + len(prompt))
        rows.append(torch.randn(8, generator=gen) * (1 + len(prompt) % 3))
    return torch.stack(rows)


def test_a_class_of_several_wordings_is_their_prompt_ensemble():
    templates = ["{}", "the sound of {}"]
    classes = [["two beeps", "two chimes"], "a beep"]
    classifier = build_zeroshot_classifier(fake_encoder, classes, templates)
    prompts = ["two beeps", "the sound of two beeps", "two chimes", "the sound of two chimes"]
    expected = F.normalize(F.normalize(fake_encoder(prompts), dim=-1).mean(0), dim=-1)
    assert torch.allclose(classifier[0], expected, atol=1e-6)
    single = F.normalize(
        F.normalize(fake_encoder(["a beep", "the sound of a beep"]), dim=-1).mean(0), dim=-1
    )
    assert torch.allclose(classifier[1], single, atol=1e-6)


def test_phrases_must_be_words_or_a_list_of_them():
    spec = {"count": {"classes": ["two"], "phrases": {"two": ["two beeps", 2]}}}
    with pytest.raises(ConfigError, match=r"data.zeroshot.count.phrases.two: words or a list"):
        zeroshot_tasks(spec, "data.zeroshot", lambda attribute: [])
    spec["count"]["phrases"]["two"] = ["two beeps", "two chimes"]
    task = zeroshot_tasks(spec, "data.zeroshot", lambda attribute: [])["count"]
    assert task.phrases == {"two": ["two beeps", "two chimes"]}
