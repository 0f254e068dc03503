"""Micro-batches of rows of similar length, without their all-padding columns (posttrain.batch, buffer.split)."""

import torch

from posttrain.batch import map_micro_batches, micro_rows, trim_columns, trimmed
from posttrain.buffer import Experience
from posttrain.models.logprobs import response_logprobs


def ragged(B=6, P=7, T=9, seed=0, vocab=20):
    """Left-padded prompts and right-padded responses of different lengths (every row at least one token)."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(2, P + 1, (B,), generator=g)
    response_len = torch.tensor([1, T, 3, 5, 2, 4][:B])
    prompt_mask = (torch.arange(P) >= P - prompt_len[:, None]).long()
    response_mask = (torch.arange(T) < response_len[:, None]).float()
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g) * prompt_mask
    response_ids = torch.randint(3, vocab, (B, T), generator=g) * response_mask.long()
    return prompt_ids, prompt_mask, response_ids, response_mask


def experience(seed=0) -> Experience:
    prompt_ids, prompt_mask, response_ids, response_mask = ragged(seed=seed)
    rand = torch.randn(response_mask.shape, generator=torch.Generator().manual_seed(seed)) * response_mask
    return Experience(prompt_ids, prompt_mask, response_ids, response_mask, response_mask, old_logprobs=rand, advantages=rand,
                      returns=rand)


def test_rows_are_grouped_by_response_length_and_cover_every_row_once():
    exp = experience()
    groups = micro_rows(exp.response_mask, 2)
    assert [len(g) for g in groups] == [2, 2, 2]
    assert sorted(torch.cat(groups).tolist()) == list(range(6))
    lengths = [exp.response_mask[g].sum(-1).tolist() for g in groups]
    assert lengths == [[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]
    assert [g.tolist() for g in micro_rows(exp.response_mask, None)] == [list(range(6))]


def test_trimming_drops_only_columns_that_are_padding_in_every_row():
    exp = experience()
    first, end = trim_columns(exp.prompt_mask, exp.response_mask)
    assert exp.prompt_mask[:, :first].sum() == 0 and exp.prompt_mask[:, first].sum() > 0
    assert exp.response_mask[:, end:].sum() == 0 and exp.response_mask[:, end - 1].sum() > 0
    short = trimmed(exp.select(torch.tensor([0, 4])))  # responses of 1 and 2 tokens
    assert short.response_mask.size(1) == 2 and short.advantages.size(1) == 2
    assert short.prompt_mask.sum() == exp.prompt_mask[[0, 4]].sum()  # no real prompt token lost
    assert trimmed(exp) is exp or trimmed(exp).response_mask.sum() == exp.response_mask.sum()


def test_micro_batches_put_back_give_the_whole_batch_values(tiny_model):
    """Per-token log-probs computed micro-batch by micro-batch on trimmed rows equal the whole batch's."""
    exp = experience(seed=1)
    with torch.no_grad():
        whole, _ = response_logprobs(tiny_model, exp.prompt_ids, exp.prompt_mask, exp.response_ids,
                                     exp.response_mask)
        back = torch.zeros_like(whole)
        for rows, m in zip(micro_rows(exp.response_mask, 2), exp.split(2)):
            assert m.response_mask.size(1) <= exp.response_mask.size(1)
            part, _ = response_logprobs(tiny_model, m.prompt_ids, m.prompt_mask, m.response_ids, m.response_mask)
            back[rows, :part.size(1)] = part
        mapped = map_micro_batches(exp, 2, lambda b: response_logprobs(
            tiny_model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)[0])
    torch.testing.assert_close(back, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(mapped, whole, atol=1e-5, rtol=0)
    widths = [m.response_mask.size(1) for m in exp.split(2)]
    assert widths == [2, 4, 9]  # the short rows no longer pay for the longest one
