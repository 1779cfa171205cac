"""Image-text retrieval metrics (Recall@K, median/mean rank), COCO/Flickr style.

Similarities are computed chunk by chunk so that evaluation on large sets never holds the
full Ni x Nt matrix; only `chunk_size` x N scores exist at any time.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _check_inputs(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int]
) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D, got image {tuple(image_emb.shape)} "
            f"and text {tuple(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: image {image_emb.shape[1]} vs text {text_emb.shape[1]}"
        )
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(
            f"text_to_image must have shape ({text_emb.shape[0]},), "
            f"got {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer indices, got {text_to_image.dtype}")
    num_images = image_emb.shape[0]
    if num_images == 0 or len(text_to_image) == 0:
        raise ValueError(
            f"need at least one image and one caption, got {num_images} and {len(text_to_image)}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image indices must lie in [0, {num_images})")
    captions_per_image = torch.bincount(text_to_image.cpu(), minlength=num_images)
    missing = (captions_per_image == 0).nonzero().flatten()
    if len(missing) > 0:
        raise ValueError(
            f"{len(missing)} image(s) have no caption (e.g. image {missing[0].item()}); "
            "every image needs at least one caption for image->text recall"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty positive integers, got {list(ks)}")


def _median(ranks: Tensor) -> float:
    """Statistical median: the mean of the two middle ranks when the count is even."""
    ranks = ranks.sort().values.double()
    n = len(ranks)
    return ((ranks[(n - 1) // 2] + ranks[n // 2]) / 2).item()


@torch.no_grad()
def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K and median/mean rank in both directions.

    Embeddings are assumed L2-normalised, so the dot product is the cosine similarity.
    `text_to_image[t]` is the image described by caption t; an image may have several captions
    (COCO has ~5), and every image must have at least one.

    - text->image: the rank of the caption's image among all images.
    - image->text: the best rank among the image's captions, i.e. an image is a hit@k if any
      of its captions is in the top k (the standard COCO protocol).

    Ranks are 1-based and count only strictly greater scores: rank = 1 + #(score > positive).
    Ties therefore resolve in favour of the positive, which makes the result deterministic
    (independent of sort order) and is what degenerate embeddings (e.g. all equal) score.

    Returns python floats: `{i2t,t2i}_r{k}` as fractions in [0, 1], plus `{i2t,t2i}_median_rank`
    and `{i2t,t2i}_mean_rank`. Computation is in float32 on the embeddings' device.
    """
    _check_inputs(image_emb, text_emb, text_to_image, ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = image_emb.device
    image_emb = image_emb.float()
    text_emb = text_emb.to(device=device, dtype=torch.float32)
    text_to_image = text_to_image.to(device=device, dtype=torch.long)

    # text -> image: one positive per caption.
    t2i_ranks = []
    for start in range(0, len(text_emb), chunk_size):
        scores = text_emb[start : start + chunk_size] @ image_emb.T  # [chunk, Ni]
        positive = scores.gather(1, text_to_image[start : start + chunk_size, None])
        t2i_ranks.append(1 + (scores > positive).sum(dim=1))

    # image -> text: the best-scoring caption gives the image's best rank.
    i2t_ranks = []
    for start in range(0, len(image_emb), chunk_size):
        scores = image_emb[start : start + chunk_size] @ text_emb.T  # [chunk, Nt]
        image_ids = torch.arange(start, start + len(scores), device=device)
        is_caption = text_to_image[None, :] == image_ids[:, None]
        positive = scores.masked_fill(~is_caption, float("-inf")).amax(dim=1, keepdim=True)
        i2t_ranks.append(1 + (scores > positive).sum(dim=1))

    metrics = {}
    ranks_by_direction = {"i2t": torch.cat(i2t_ranks), "t2i": torch.cat(t2i_ranks)}
    for direction, ranks in ranks_by_direction.items():
        for k in ks:
            metrics[f"{direction}_r{k}"] = (ranks <= k).double().mean().item()
    for direction, ranks in ranks_by_direction.items():
        metrics[f"{direction}_median_rank"] = _median(ranks)
        metrics[f"{direction}_mean_rank"] = ranks.double().mean().item()
    return metrics


def _reranked_best(
    queries: Tensor,
    keys: Tensor,
    score: Callable[[Tensor, Tensor], Tensor],
    k: int,
    chunk_size: int,
) -> Tensor:
    """Per query, the key among its top-k by similarity that `score(query, key)` ranks first."""
    best = []
    for start in range(0, len(queries), chunk_size):
        cand = (queries[start : start + chunk_size] @ keys.T).topk(min(k, len(keys)), dim=1).indices
        query = torch.arange(start, start + len(cand), device=cand.device)
        scores = score(query.repeat_interleave(cand.shape[1]), cand.reshape(-1)).view(cand.shape)
        best.append(cand.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1))
    return torch.cat(best)


@torch.no_grad()
def reranked_recall_at_1(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    score_pairs: Callable[[Tensor, Tensor], Tensor],
    k: int = 16,
    chunk_size: int = 256,
) -> dict[str, float]:
    """R@1 after re-ranking each query's top-k by a pair scorer (ALBEF/BLIP: ITM over ITC).

    `score_pairs(image_index, text_index)` returns a score per pair (higher = better match).
    Image->text counts a hit when the best re-ranked text is one of the image's captions.
    Only top-k candidates are scored, chunk by chunk, so memory stays bounded.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    best_text = _reranked_best(image_emb, text_emb, score_pairs, k, chunk_size)
    best_image = _reranked_best(
        text_emb, image_emb, lambda text, image: score_pairs(image, text), k, chunk_size
    )
    images = torch.arange(len(image_emb), device=best_text.device)
    return {
        "i2t_r1_reranked": (text_to_image[best_text] == images).float().mean().item(),
        "t2i_r1_reranked": (best_image == text_to_image).float().mean().item(),
    }


def anchor_profiles(embeddings: Tensor, anchors: Tensor, scale: float) -> Tensor:
    """[N, K] softmax over K text anchors of `scale` x cosine similarity: where each item
    sits among the anchors. Items of two modalities compare through their profiles over
    paired anchors (anchor k of one modality goes with anchor k of the other):
    `profiles_a @ profiles_b.T` is the probability that both pick the same anchor pair,
    so `retrieval_metrics(profiles_a, profiles_b, ...)` scores retrieval between them
    through text (benchmarks/cross_modal.py)."""
    return (scale * embeddings.float() @ anchors.float().T).softmax(dim=-1)
