"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

The order of the filters (temperature, then top-k, then top-p) is the one transformers' `generate` applies, so a
seeded run here and there draws from the same distribution.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# Candidates examined before falling back to a full sort for top-p: the nucleus of a real LM almost always fits.
_TOP_P_CANDIDATES = 256


def log_softmax_at(logits: FloatArray, chosen: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """log p(chosen) under the model's own distribution (temperature 1), one value per row."""
    rows = np.arange(logits.shape[0])
    peak = logits.max(axis=1, keepdims=True)
    # float32 is plenty for a log-sum-exp shifted by the row's maximum, and halves the work per step.
    total = np.exp(logits - peak).sum(axis=1, dtype=np.float64)
    return (logits[rows, chosen] - peak[:, 0]).astype(np.float64) - np.log(total)


def choose_tokens(
    logits: FloatArray,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: npt.NDArray[np.float64] | None,
) -> npt.NDArray[np.int64]:
    """Pick one token per row of `logits` [rows, vocab].

    temperature 0 is greedy. Otherwise `uniforms` holds one U(0,1) draw per row, made by the caller from that
    row's own generator, so a row's tokens do not depend on which other rows share its batch.
    """
    if temperature <= 0.0:
        return np.asarray(logits.argmax(axis=1), dtype=np.int64)
    if uniforms is None:
        raise ValueError("sampling needs one uniform draw per row")
    scaled = logits.astype(np.float32) / np.float32(temperature)
    vocab = scaled.shape[1]
    k = top_k if 0 < top_k < vocab else 0
    if not k and top_p >= 1.0:
        # Plain temperature sampling: draw from the whole softmax; no ordering of the vocabulary is needed.
        weights = np.exp(scaled - scaled.max(axis=1, keepdims=True), dtype=np.float32)
        cdf = np.cumsum(weights, axis=1, dtype=np.float64)
        picks = (cdf < (uniforms * cdf[:, -1])[:, None]).sum(axis=1)
        return np.minimum(picks, vocab - 1).astype(np.int64)
    # Only the most likely tokens can be drawn under top-k or top-p, so look at a few hundred candidates instead
    # of sorting the whole vocabulary at every step.
    width = k or (min(vocab, _TOP_P_CANDIDATES) if top_p < 1.0 else vocab)
    peak = scaled.max(axis=1, keepdims=True)
    cand, cand_logits = _top(scaled, width)
    weights = np.exp((cand_logits - peak).astype(np.float64))
    # top-k renormalises over the k survivors; a plain top-p cut is measured against the whole vocabulary.
    total = weights.sum(axis=1) if k else np.exp((scaled - peak).astype(np.float64)).sum(axis=1)
    probs = weights / total[:, None]
    if not k and width < vocab and np.any(probs.sum(axis=1) < top_p):
        cand, cand_logits = _top(scaled, vocab)  # the nucleus is wider than the candidates: sort it all
        probs = np.exp((cand_logits - peak).astype(np.float64))
        probs /= probs.sum(axis=1, keepdims=True)
    return _draw(cand, probs, top_p, uniforms)


def _top(scaled: FloatArray, width: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The `width` largest logits of each row, in descending order, with their token ids."""
    vocab = scaled.shape[1]
    if width < vocab:
        cand = np.argpartition(-scaled, width - 1, axis=1)[:, :width]
    else:
        cand = np.broadcast_to(np.arange(vocab, dtype=np.int64), scaled.shape)
    cand_logits = np.take_along_axis(scaled, cand, axis=1)
    order = np.argsort(-cand_logits, axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(cand_logits, order, axis=1)


def _draw(
    cand: npt.NDArray[np.int64],
    probs: npt.NDArray[np.floating],
    top_p: float,
    uniforms: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    if top_p < 1.0:
        cumulative = np.cumsum(probs, axis=1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        keep = (cumulative - probs) < top_p
        probs = np.where(keep, probs, 0.0)
    cdf = np.cumsum(probs, axis=1)
    targets = uniforms * cdf[:, -1]
    picks = (cdf < targets[:, None]).sum(axis=1)
    picks = np.minimum(picks, cand.shape[1] - 1)
    return np.asarray(cand[np.arange(cand.shape[0]), picks], dtype=np.int64)
