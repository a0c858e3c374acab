"""Next-token sampling: the short-list filters give the distribution of filtering the whole vocabulary."""

import numpy as np
import pytest
import torch

from inference.params import GenerationParams
from inference.sampling import FIRST_WINDOW, candidates, draw, penalise, sample_next

VOCAB = 262_144  # Gemma 3's vocabulary, where sorting everything is what made sampling slow


def full_vocabulary_distribution(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """The reference: temperature, then top-k and top-p masks over every token, as probabilities."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before > params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()


def short_list_distribution(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    probs, ids = candidates(logits.float(), params)
    full = probs if ids is None else torch.zeros(logits.numel()).index_add_(0, ids, probs)
    return full / full.sum()


def peaked_logits(seed: int, spread: float) -> torch.Tensor:
    """Logits like a language model's: a few strong tokens over a long flat tail (small spread: flatter)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator) * spread
    logits[torch.randint(VOCAB, (20,), generator=generator)] += 8.0 * spread
    return logits


SETTINGS = [
    dict(temperature=0.7, top_k=40, top_p=0.95),  # the chat defaults
    dict(temperature=1.0, top_k=40, top_p=1.0),
    dict(temperature=1.3, top_k=5, top_p=0.5),
    dict(temperature=1.0, top_k=0, top_p=0.9),
    dict(temperature=0.5, top_k=0, top_p=0.999),
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=VOCAB + 5, top_p=0.8),  # top-k beyond the vocabulary filters nothing
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("spread", [3.0, 0.3])
def test_short_list_gives_the_full_vocabulary_distribution(settings, spread):
    params = GenerationParams(**settings)
    logits = peaked_logits(seed=7, spread=spread)
    expected = full_vocabulary_distribution(logits, params)
    got = short_list_distribution(logits, params)
    assert torch.equal(got > 0, expected > 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_a_flat_nucleus_widens_the_window_until_it_fits():
    logits = torch.zeros(VOCAB)  # every token equally likely: the nucleus is 90% of the vocabulary
    params = GenerationParams(temperature=1.0, top_k=0, top_p=0.9)
    probs, ids = candidates(logits, params)
    assert ids.numel() > 4 * FIRST_WINDOW
    kept = int((probs > 0).sum())
    assert abs(kept - 0.9 * VOCAB) <= 2
    torch.testing.assert_close(short_list_distribution(logits, params), full_vocabulary_distribution(logits, params))


def test_tokens_tied_with_the_kth_stay_in():
    logits = torch.full((1000,), -5.0)
    logits[[3, 10, 11, 12]] = torch.tensor([4.0, 2.0, 2.0, 2.0])
    probs, ids = candidates(logits, GenerationParams(temperature=1.0, top_k=2, top_p=1.0))
    assert sorted(ids[probs > 0].tolist()) == [3, 10, 11, 12]


def test_the_same_seed_draws_the_same_tokens():
    logits = peaked_logits(seed=1, spread=1.0)
    params = GenerationParams(temperature=1.0, top_k=0, top_p=0.95)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample_next(logits.clone(), params, generator) for _ in range(30)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0, 1.5])
    params = GenerationParams(temperature=1.0, top_k=3, top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_next(logits, params, generator) for _ in range(3000)]),
                            minlength=5).float()
    expected = full_vocabulary_distribution(logits, params) * 3000
    assert counts[0] == counts[3] == 0
    assert torch.all((counts - expected).abs() < 4 * expected.sqrt() + 1)


def test_draw_never_picks_a_token_of_probability_zero():
    probs = torch.zeros(10_000)
    probs[[0, 4_321, 9_998]] = torch.tensor([0.2, 0.5, 0.3])
    generator = torch.Generator().manual_seed(3)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(2000)]), minlength=10_000)
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 4_321, 9_998}
    assert abs(int(counts[4_321]) - 1000) < 120
    assert draw(torch.tensor([0.0, 0.0, 1e-30, 0.0]), generator) == 2


def test_sample_next_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits.clone(), GenerationParams(temperature=0.0), None) == 1
    top2 = GenerationParams(temperature=1.0, top_k=2, top_p=1.0)
    assert {sample_next(logits.clone(), top2, generator) for _ in range(50)} == {1, 2}
    nucleus = GenerationParams(temperature=1.0, top_k=0, top_p=0.01)
    assert {sample_next(logits.clone(), nucleus, generator) for _ in range(20)} == {1}
    penalised = GenerationParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits.clone(), penalised, None, torch.tensor([1])) == 2


def test_bfloat16_logits_are_accepted():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0], dtype=torch.bfloat16)
    params = GenerationParams(temperature=0.8, top_k=0, top_p=0.9)
    assert sample_next(logits, params, torch.Generator().manual_seed(0)) in {1, 2}


def test_repetition_penalty_leaves_the_models_logits_alone():
    """The model's logits are inference tensors, read-only outside inference mode: the penalty works on
    a copy (it used to fail with 'Inplace update to inference tensor outside InferenceMode')."""
    with torch.inference_mode():
        logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    before = logits.clone()
    penalised = GenerationParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, penalised, None, torch.tensor([1])) == 2
    assert torch.equal(logits, before)


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    history = torch.tensor([3, 3, 1])
    params = GenerationParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert params.penalised
    penalised = penalise(logits.clone(), params, history)
    assert penalised.tolist() == [1.0, 2.0 - 0.5 - 0.25, 3.0, 4.0 - 0.5 - 0.5]
    assert sample_next(logits, GenerationParams(temperature=0.0, frequency_penalty=2.0), None, history) == 2
    assert not GenerationParams(temperature=0.0).penalised


def best_by_sorting(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for `best`: every value sorted, largest first, equal ones by index."""
    order = torch.from_numpy(np.lexsort((np.arange(logits.numel()), -logits.numpy()))[:k])
    return logits[order], order


@pytest.mark.parametrize("k", [1, 40, 256, 1024, 40_000])
def test_best_is_torchs_topk_with_ties_by_index(k):
    """`best` (a numpy threshold first, on long CPU rows) picks what torch.topk picks, best first, and
    equal values lower index first: bfloat16-rounded logits (a GPU's, or a CPU's with native bfloat16)
    are full of ties, some at the threshold and at the k-th place."""
    from inference.sampling import best

    rows = [peaked_logits(seed=k, spread=3.0), peaked_logits(seed=k, spread=0.3), torch.randn(5000)]
    rows += [row.to(torch.bfloat16).float() for row in rows]
    rows.append(torch.softmax(peaked_logits(seed=k, spread=3.0) / 0.05, dim=-1))  # mostly zeros: the plain path
    for logits in rows:
        values, ids = best(logits, min(k, logits.numel()))
        want_values, want_ids = best_by_sorting(logits, min(k, logits.numel()))
        assert torch.equal(values, want_values) and torch.equal(ids, want_ids)


def test_a_seed_draws_the_same_token_whichever_path_finds_the_best(monkeypatch):
    """Tied logits in another order would let the same random point land on another token."""
    from inference import sampling

    params = GenerationParams(temperature=0.8, top_k=40, top_p=0.95)
    logits = peaked_logits(seed=5, spread=2.0).to(torch.bfloat16).float()
    fast = [sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(60)]
    monkeypatch.setattr(sampling, "PREFILTER_MIN", VOCAB + 1)  # no threshold: torch's topk over the whole row
    plain = [sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(60)]
    assert fast == plain


def test_best_and_greedy_treat_nan_and_ties_as_torch_does():
    from inference.sampling import best, greedy_tokens

    logits = peaked_logits(seed=1, spread=1.0)
    logits[77] = float("nan")
    assert torch.equal(best(logits, 40)[1], torch.topk(logits, 40)[1])  # NaN first, as torch's topk has it
    rows = torch.randn(3, VOCAB)
    rows[1, 9] = float("nan")
    rows[2, [5, 6]] = 100.0  # a tie: the first
    assert greedy_tokens(rows) == rows.argmax(-1).tolist() == [int(rows[0].argmax()), 9, 5]
    assert greedy_tokens(rows[0]) == [int(rows[0].argmax())]
    assert greedy_tokens(rows.to(torch.bfloat16)) == rows.to(torch.bfloat16).argmax(-1).tolist()
    grad = torch.randn(VOCAB, requires_grad=True)  # outside inference mode, as torch's own functions take it
    assert greedy_tokens(grad) == [int(grad.argmax())]
    assert torch.equal(best(grad, 40)[1], best_by_sorting(grad.detach(), 40)[1])
