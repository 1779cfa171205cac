import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymodal.evaluation.retrieval import anchor_profiles, retrieval_metrics
from tests.helpers import embeddings_for


def test_hand_computed_one_caption_per_image():
    image_emb, text_emb = embeddings_for(
        [
            [0.9, 0.8, 0.1],  # image 0: caption 0 rank 1
            [0.5, 0.3, 0.2],  # image 1: caption 1 rank 2
            [0.4, 0.7, 0.6],  # image 2: caption 2 rank 2
        ]
    )
    # t2i, per column: caption 0 -> image 0 rank 1, caption 1 -> image 1 rank 3 (0.8, 0.7 above),
    # caption 2 -> image 2 rank 1.
    metrics = retrieval_metrics(image_emb, text_emb, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert metrics == pytest.approx(
        {
            "i2t_r1": 1 / 3,
            "i2t_r2": 1.0,
            "t2i_r1": 2 / 3,
            "t2i_r2": 2 / 3,
            "i2t_median_rank": 2.0,
            "t2i_median_rank": 1.0,
            "i2t_mean_rank": 5 / 3,
            "t2i_mean_rank": 5 / 3,
        }
    )
    assert all(type(v) is float for v in metrics.values())


def test_multi_caption_image_hits_if_any_caption_in_top_k():
    image_emb, text_emb = embeddings_for(
        [
            [0.1, 0.9, 0.5, 0.6],  # image 0: caption 0 rank 4, caption 1 rank 1 -> rank 1
            [0.3, 0.2, 0.8, 0.7],  # image 1: caption 2 rank 1
            [0.2, 0.1, 0.9, 0.4],  # image 2: caption 3 rank 2 (0.9 above)
        ]
    )
    text_to_image = torch.tensor([0, 0, 1, 2])
    # t2i: caption 0 col [0.1, 0.3, 0.2] -> rank 3; caption 1 -> 1; caption 2 col [.5, .8, .9]
    # -> rank 2; caption 3 col [.6, .7, .4] -> rank 3.
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 2))
    assert metrics == pytest.approx(
        {
            "i2t_r1": 2 / 3,
            "i2t_r2": 1.0,
            "t2i_r1": 1 / 4,
            "t2i_r2": 2 / 4,
            "i2t_median_rank": 1.0,
            "t2i_median_rank": 2.5,
            "i2t_mean_rank": 4 / 3,
            "t2i_mean_rank": 9 / 4,
        }
    )


def test_ties_count_only_strictly_greater_scores():
    image_emb, text_emb = embeddings_for([[0.5, 0.5], [0.5, 0.5]])
    metrics = retrieval_metrics(image_emb, text_emb, torch.tensor([0, 1]), ks=(1,))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 1.0
    assert metrics["i2t_mean_rank"] == metrics["t2i_mean_rank"] == 1.0


def reference_ranks(image: np.ndarray, text: np.ndarray, text_to_image: np.ndarray):
    """Full-matrix ranks via argsort, independent of the chunked implementation."""
    scores = image @ text.T
    t2i = np.array(
        [np.where(np.argsort(-scores[:, t]) == i)[0][0] + 1 for t, i in enumerate(text_to_image)]
    )
    i2t = np.array(
        [
            min(
                np.where(np.argsort(-scores[i]) == t)[0][0] + 1
                for t in np.where(text_to_image == i)[0]
            )
            for i in range(len(image))
        ]
    )
    return i2t, t2i


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_matches_full_matrix_reference(chunk_size):
    rng = np.random.default_rng(0)
    num_images, dim = 23, 16
    # Every image gets 1-3 captions, shuffled so captions of one image are not contiguous.
    text_to_image = np.concatenate([np.full(rng.integers(1, 4), i) for i in range(num_images)])
    text_to_image = rng.permutation(text_to_image)
    image = rng.standard_normal((num_images, dim)).astype(np.float32)
    # Captions lie near their image so ranks spread over 1..N rather than being all random.
    text = image[text_to_image] + 1.5 * rng.standard_normal((len(text_to_image), dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    scores = image @ text.T
    row_gaps = np.diff(np.sort(scores, axis=1), axis=1).min()
    col_gaps = np.diff(np.sort(scores, axis=0), axis=0).min()
    assert min(row_gaps, col_gaps) > 1e-6, "fixture must be tie-free"

    ks = (1, 5, 10)
    metrics = retrieval_metrics(
        torch.from_numpy(image),
        torch.from_numpy(text),
        torch.from_numpy(text_to_image),
        ks=ks,
        chunk_size=chunk_size,
    )
    i2t, t2i = reference_ranks(image, text, text_to_image)
    expected = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        expected |= {f"{name}_r{k}": float(np.mean(ranks <= k)) for k in ks}
        expected[f"{name}_median_rank"] = float(np.median(ranks))
        expected[f"{name}_mean_rank"] = float(np.mean(ranks))
    assert metrics == pytest.approx(expected)
    assert 0 < metrics["t2i_r1"] < 1 and 0 < metrics["i2t_r1"] < 1, "fixture too easy or too hard"


def test_low_precision_inputs_are_scored_in_float32():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1).bfloat16()
    text = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1).bfloat16()
    text_to_image = torch.arange(8)
    assert retrieval_metrics(image, text, text_to_image) == retrieval_metrics(
        image.float(), text.float(), text_to_image
    )


def test_image_without_caption_is_rejected():
    image_emb, text_emb = embeddings_for([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(image_emb, text_emb, torch.tensor([0, 1]))


def test_out_of_range_caption_index_is_rejected():
    image_emb, text_emb = embeddings_for([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="indices"):
        retrieval_metrics(image_emb, text_emb, torch.tensor([0, 2]))


def test_reranking_by_an_oracle_scorer_fixes_recall_at_1():
    """Embeddings rank the true caption 2nd; a pair scorer that knows the truth moves it to 1st."""
    from polymodal.evaluation.retrieval import reranked_recall_at_1

    n = 6
    text = torch.eye(n, 8)
    # each image is closest to the *next* caption, second closest to its own
    image = torch.nn.functional.normalize(text.roll(-1, 0) + 0.6 * text, dim=-1)
    pairs = torch.arange(n)
    assert retrieval_metrics(image, text, pairs)["i2t_r1"] == 0.0

    def oracle(image_index, text_index):
        return (image_index == text_index).float()

    result = reranked_recall_at_1(image, text, pairs, oracle, k=3)
    assert result == {"i2t_r1_reranked": 1.0, "t2i_r1_reranked": 1.0}
    assert reranked_recall_at_1(image, text, pairs, oracle, k=1)["i2t_r1_reranked"] == 0.0


def test_anchor_profiles_score_the_chance_of_picking_the_same_anchor_pair():
    """profiles_a @ profiles_b.T = sum_k p_a(k) p_b(k) (written out here), and items that
    sit on their own anchors retrieve their pair through them."""
    generator = torch.Generator().manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1)

    a, b, anchors_a, anchors_b = unit(5, 8), unit(4, 8), unit(3, 8), unit(3, 8)
    pa, pb = anchor_profiles(a, anchors_a, 10.0), anchor_profiles(b, anchors_b, 10.0)
    for i in range(5):
        for j in range(4):
            sa = [math.exp(10.0 * float(a[i] @ t)) for t in anchors_a]
            sb = [math.exp(10.0 * float(b[j] @ t)) for t in anchors_b]
            expected = sum(x / sum(sa) * y / sum(sb) for x, y in zip(sa, sb, strict=True))
            assert float(pa[i] @ pb[j]) == pytest.approx(expected, rel=1e-5)
    images, sounds = unit(6, 8), unit(6, 8)  # each on its own anchor: pairs found exactly
    metrics = retrieval_metrics(
        anchor_profiles(images, images, 50.0),
        anchor_profiles(sounds, sounds, 50.0),
        torch.arange(6),
    )
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 1.0
