"""EmbeddingEvaluator: several captions of one image (COCO's image_id) score as one image."""

import json
from pathlib import Path

import pytest
import torch

from polymodal.evaluation.evaluator import EmbeddingEvaluator
from polymodal.evaluation.zeroshot import ZeroShotTask
from tests.helpers import embeddings_for, init_gloo, run_ranks

# The hand-computed fixture of test_retrieval's multi-caption test: 3 images, 4 captions,
# caption -> image [0, 0, 1, 2]; i2t ranks [1, 1, 2], t2i ranks [3, 1, 2, 3].
SCORES = [[0.1, 0.9, 0.5, 0.6], [0.3, 0.2, 0.8, 0.7], [0.2, 0.1, 0.9, 0.4]]
EXPECTED = {
    "retrieval/i2t_r1": 2 / 3,
    "retrieval/i2t_r5": 1.0,
    "retrieval/t2i_r1": 1 / 4,
    "retrieval/i2t_median_rank": 1.0,
    "retrieval/t2i_median_rank": 2.5,
    "retrieval/i2t_mean_rank": 4 / 3,
    "retrieval/t2i_mean_rank": 9 / 4,
}


def one_sample_per_caption() -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The shard layout `polymodal-data build` writes for COCO: a sample per caption, its
    image repeated, `image_id` in the json (the last image has none: its own image)."""
    image_emb, text_emb = embeddings_for(SCORES)
    image_of_sample = [0, 0, 1, 2]
    metas = [{"image_id": 7}, {"image_id": 7}, {"image_id": 8}, {}]
    return image_emb[image_of_sample], text_emb, metas


def test_captions_sharing_an_image_id_are_one_image():
    image, text, metas = one_sample_per_caption()
    evaluator = EmbeddingEvaluator()
    evaluator.update(image, text, metas, ["c0", "c1", "c2", "c3"])
    first, sample_to_image = evaluator.image_groups()
    assert first.tolist() == [0, 2, 3]
    assert sample_to_image.tolist() == [0, 0, 1, 2]
    metrics = evaluator.compute(lambda prompts: torch.zeros(len(prompts), 4))
    assert {k: metrics[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert evaluator.captions == ["c0", "c1", "c2", "c3"]


def test_without_grouping_every_sample_is_its_own_image():
    image, text, metas = one_sample_per_caption()
    evaluator = EmbeddingEvaluator(group_by=None)
    evaluator.update(image, text, metas)
    metrics = evaluator.compute(lambda prompts: torch.zeros(len(prompts), 4))
    # image 0 now appears twice, each copy with one positive caption: i2t ranks are
    # [4, 1, 1, 2] (caption 0 scores lowest for its copy) instead of the grouped [1, 1, 2]
    assert evaluator.image_groups()[0].tolist() == [0, 1, 2, 3]
    assert metrics["retrieval/i2t_r1"] == pytest.approx(2 / 4)
    assert metrics["retrieval/i2t_mean_rank"] == pytest.approx(8 / 4)


def test_zero_shot_counts_each_image_once():
    """Image 7 has two captions but is one image: a wrong prediction on it costs 1/2, not 2/3."""
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    metas = [{"image_id": 7, "kind": "b"}, {"image_id": 7, "kind": "b"}, {"kind": "b"}]
    evaluator = EmbeddingEvaluator({"kind": ZeroShotTask(["a", "b"], ["{}"])})
    evaluator.update(image, torch.eye(3, 2), metas)

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0] if p == "a" else [0.0, 1.0] for p in prompts])

    metrics = evaluator.compute(encode_text)
    assert metrics["zeroshot/kind_acc"] == pytest.approx(1 / 2)
    assert evaluator.confusion["kind"].tolist() == [[0, 0], [1, 1]]


def test_labels_match_class_names_and_numbers_their_text():
    """A json value names its class; a number matches the class named by its digits;
    a sample without the field, or with a value outside the list, is not scored."""
    metas = [{"digit": 7}, {"digit": "one"}, {"digit": "7"}, {}, {"digit": "two"}]
    task = ZeroShotTask(["one", "7"], ["the number {}"])
    evaluator = EmbeddingEvaluator({"digit": task}, retrieval=False)
    evaluator.update(torch.eye(5, 2), torch.eye(5, 2), metas)
    assert evaluator.labels("digit").tolist() == [1, 0, 1, -1, -1]

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0] if "one" in p else [1.0, 0.0] for p in prompts])

    assert evaluator.compute(encode_text)["zeroshot/digit_acc"] == pytest.approx(2 / 3)


def _gather_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    evaluator = EmbeddingEvaluator(retrieval=False)
    count = rank + 1  # uneven shares: rank 0 one sample, rank 1 two
    evaluator.update(
        torch.full((count, 2), float(rank)),
        torch.full((count, 2), float(rank)),
        [{"rank": rank, "i": i} for i in range(count)],
        [f"caption {rank}.{i}" for i in range(count)],
    )
    evaluator.gather()
    image, _ = evaluator.embeddings()
    result = {
        "image": image[:, 0].tolist(),
        "meta": evaluator._meta,
        "captions": evaluator.captions,
    }
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def test_gather_joins_every_ranks_samples_in_rank_order(tmp_path):
    run_ranks(_gather_on_rank, 2, str(tmp_path))
    expected = {
        "image": [0.0, 1.0, 1.0],
        "meta": [{"rank": 0, "i": 0}, {"rank": 1, "i": 0}, {"rank": 1, "i": 1}],
        "captions": ["caption 0.0", "caption 1.0", "caption 1.1"],
    }
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == expected
