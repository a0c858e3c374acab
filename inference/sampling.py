"""Pick the next token from one row of logits: greedy, or temperature with top-k / top-p.

Vocabularies run to 262,144 tokens (Gemma 3), and sorting that many floats for top-p costs a large
share of a CPU decode step (figures in bench/RESULTS.md). So the filters work on a
short list: the top-k best tokens when top-k is set, otherwise a window of the best tokens that is
widened until it holds the whole nucleus. Both give the same distribution as filtering the full
vocabulary: what is cut is only tokens that the full filter would give probability zero. The draw
itself inverts the running sum of the probabilities instead of calling torch.multinomial.

Finding the best tokens is itself most of a row's cost: torch's topk over 262,144 floats takes ~0.5 ms
and its argmax ~0.3 ms on this project's CPUs, several per batched decode step. On the CPU both go
through numpy (`greedy_tokens`, `best`): its argmax is vectorised (~10x faster), and the k best are
looked for only among the tokens at least as good as the k-th best of every 8th token, a superset of
them (a few hundred tokens for k = 40) found in two vectorised passes. Equal logits come out lower id
first (torch's topk leaves their order to its sort), so a seed draws the same token whichever way the
best were found.
"""

from __future__ import annotations

import numpy as np
import torch

from .params import GenerationParams

FIRST_WINDOW = 256  # top-p without top-k looks at this many best tokens first, then 4x more at a time
STRIDE = 8  # `best` takes its threshold from every STRIDE-th value
PREFILTER_MIN = 4096  # values below which `best` is torch's topk as it is
PREFILTER_SHARE = 16  # ... and where more than 1/16 of the row passes its threshold


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's best token (the first on ties; a NaN counts as the best, as in torch's argmax) of
    logits [rows, vocab] or [vocab]; a list of one token per row, or a one-item list."""
    on_numpy = logits.device.type == "cpu" and logits.dtype == torch.float32
    found = logits.detach().numpy().argmax(-1) if on_numpy else logits.argmax(-1)
    return [int(found)] if found.ndim == 0 else found.tolist()


def best(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of a 1-D tensor, largest first, and their indices: `torch.topk(values, k)`, except that
    equal values come lower index first, also where the k-th place cuts a run of them (torch leaves both
    to its sort).

    On the CPU (float32, no NaN), over a long row: the k-th largest of every STRIDE-th value is at most the
    row's k-th largest, so the values at least that large hold the k best; only they are sorted. Where
    they are a large share of the row (a low temperature's probabilities, mostly zeros), the k best are
    the values above the k-th largest and the first ones equal to it."""
    if values.device.type != "cpu" or values.dtype != torch.float32:
        return _ties_in_order(*torch.topk(values, k))
    values = values.detach()
    row = values.numpy()
    size = row.size
    if np.isnan(row.max()):  # NaN sorts above everything in torch's topk
        return _ties_in_order(*torch.topk(values, k))
    if size >= PREFILTER_MIN and k * STRIDE * 4 <= size:
        threshold = float(torch.topk(values[::STRIDE], k).values[-1])  # numpy's partition is slow on ties
        passing = row >= threshold
        if np.count_nonzero(passing) <= size // PREFILTER_SHARE:
            return _first_in_order(row, np.flatnonzero(passing), k)
        above = np.flatnonzero(row > threshold)
        if above.size < k:  # then the threshold is the k-th largest (ties with it, mostly zeros, fill up)
            return _with_ties(row, above, threshold, k)
    kth = float(torch.topk(values, k).values[-1])
    return _with_ties(row, np.flatnonzero(row > kth), kth, k)


def _with_ties(row: np.ndarray, above: np.ndarray, kth: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best from the indices of the values above the k-th largest and the first ones equal to it."""
    return _first_in_order(row, np.concatenate([above, np.flatnonzero(row == kth)[:k - above.size]]), k)


def _first_in_order(row: np.ndarray, ids: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of `ids` (indices into `row`) by value, largest first, then by index."""
    chosen = ids[np.lexsort((ids, -row[ids]))[:k]]
    return torch.from_numpy(row[chosen]), torch.from_numpy(chosen)


def _ties_in_order(top: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's topk result with each run of equal values ordered by index (nothing to do without ties)."""
    if top.numel() < 2 or not bool((top[1:] == top[:-1]).any()):
        return top, ids
    order = np.lexsort((ids.cpu().numpy(), -top.detach().float().cpu().numpy()))
    order = torch.from_numpy(order).to(top.device)
    return top[order], ids[order]


def sample_next(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None,
                history: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> int:
    """Pick the next token from one row of logits (any float dtype, on the CPU).

    `allowed`: a boolean mask over the vocabulary (constrained decoding): the token is drawn from those
    alone, as if every other logit were minus infinity."""
    logits = logits.float()
    if params.penalised and history is not None and history.numel():
        # a copy: the model's logits are inference tensors (read-only out here) and stay untouched
        logits = penalise(logits.clone(), params, history)
    if allowed is not None:
        ids = torch.nonzero(allowed).flatten()
        return int(ids[choose(logits[ids], params, generator)])
    return choose(logits, params, generator)


def choose(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """The index of the token picked from float logits: greedy, or drawn after temperature, top-k, top-p."""
    if params.greedy:
        return greedy_tokens(logits)[0]
    probs, ids = candidates(logits, params)
    index = draw(probs, generator)
    return index if ids is None else int(ids[index])


def penalise(logits: torch.Tensor, params: GenerationParams, history: torch.Tensor) -> torch.Tensor:
    """The repetition penalty (divides positive logits of produced tokens, multiplies negative ones), then
    OpenAI's presence and frequency penalties (minus `presence` once, minus `frequency` per occurrence)."""
    seen, counts = history.unique(return_counts=True)
    if params.repetition_penalty != 1.0:
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        logits[seen] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def candidates(logits: torch.Tensor, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens that temperature, top-k and top-p leave, as (unnormalised probabilities, ids);
    ids None: no filter, the probabilities are the whole vocabulary's in token order."""
    if params.top_k and params.top_k < logits.numel():
        values, ids = top_k_with_ties(logits, params.top_k)
        probs = torch.softmax(values / params.temperature, dim=-1)
    elif params.top_p < 1.0:
        probs, ids = nucleus_window(torch.softmax(logits / params.temperature, dim=-1), params.top_p)
    else:
        return torch.softmax(logits / params.temperature, dim=-1), None
    if params.top_p < 1.0:
        probs = keep_nucleus(probs, params.top_p)
    return probs, ids


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn in proportion to `probs` (not all zero) by inverting their running sum.

    torch.multinomial over a 262,144-token vocabulary is several times slower on a CPU (bench/RESULTS.md).
    The running sum is in float64 so that even the rarest tokens keep their share.
    """
    cumulative = torch.cumsum(probs, dim=0, dtype=torch.float64)
    point = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, point, right=True))
    if index >= probs.numel():  # the point rounded up to the total
        index = int(torch.nonzero(probs)[-1])
    return index


def top_k_with_ties(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best logits and their ids, best first, plus any that tie with the k-th."""
    values, ids = best(logits, k)
    tied = count_at_least(logits, float(values[-1]))
    if tied > k:
        values, ids = best(logits, tied)
    return values, ids


def count_at_least(values: torch.Tensor, floor: float) -> int:
    """How many of `values` (1-D) are >= floor; through numpy on the CPU (~6x faster over 262,144 floats)."""
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return int(np.count_nonzero(values.detach().numpy() >= floor))
    return int((values >= floor).sum())


def nucleus_window(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best tokens' probabilities and ids, best first, enough of them to hold the top-p nucleus."""
    size = min(FIRST_WINDOW, probs.numel())
    while True:
        values, ids = best(probs, size)
        if size == probs.numel() or float(torch.cumsum(values, dim=-1)[-2]) > top_p:
            return values, ids  # the nucleus ends before the window's last token
        size = min(size * 4, probs.numel())


def keep_nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tokens after the smallest best-first prefix whose probability exceeds top_p."""
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return sorted_probs.masked_fill(before > top_p, 0.0)


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log probability of `token` and the `top_n` most likely tokens (id, log probability), best
    first, under the model's own distribution: the log-softmax of the raw logits, before any penalty,
    temperature or filter."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logprobs[token])
    if not top_n:
        return chosen, []
    values, ids = torch.topk(logprobs, min(top_n, logprobs.numel()))
    return chosen, list(zip(ids.tolist(), values.tolist()))
