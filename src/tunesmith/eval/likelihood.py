"""Log-likelihoods of answer choices as continuations of a context, as lm-evaluation-harness
computes them, batched: each item's context once per row, its choices after it (general.py's
multiple-choice probes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..progress import Progress

TOKENS_PER_BATCH = 4096  # padded tokens per forward when scoring log-likelihoods


def text_start(tokenizer) -> list[int]:
    """BOS where the tokenizer starts every text with it, as the model saw text in pre-training
    (Gemma, Llama 3, Mistral): without it Gemma's probe scores are near chance. Else nothing."""
    first = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and first and first[0] == bos else []


def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context (after `text_start`) and of the continuation as they fall in the
    whole text: the whole is encoded and the context's tokens cut off, so a token spanning the
    boundary stays whole (the harness's method). Trailing white space of the context moves to the
    continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    start = text_start(tokenizer)
    whole = start + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = start + tokenizer(context, add_special_tokens=False)["input_ids"]
    if not head:  # an empty context: the first continuation token is predicted from end-of-text
        head = [tokenizer.eos_token_id]
        whole = head + whole
    return whole[:len(head)], whole[len(head):]


@dataclass
class Row:
    """One row of a forward: an item's context once, then each choice's continuation tokens; every
    continuation attends to the context and to itself, never to another choice (positions restart
    after the context for each), so one forward scores all the choices of an item."""

    item: int
    context: list[int]
    tails: list[tuple[int, list[int]]]  # (choice, continuation token ids)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(t) for _, t in self.tails)


def rows_for(tokenizer, prompts: list[tuple[str, list[str]]]) -> list[Row]:
    """Rows for the items' (context, choices): one per item where every choice leaves the context's
    tokens as they are (the usual case), else one per choice."""
    rows = []
    for item, (context, choices) in enumerate(prompts):
        pairs = [continuation_ids(tokenizer, context, " " + choice) for choice in choices]
        if len({tuple(head) for head, _ in pairs}) == 1:
            rows.append(Row(item, pairs[0][0], [(c, tail) for c, (_, tail) in enumerate(pairs)]))
        else:
            rows += [Row(item, head, [(c, tail)]) for c, (head, tail) in enumerate(pairs)]
    return rows


def shared_context_batch(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids and a (batch, 1, width, width) boolean mask for rows of a context
    followed by continuations. Padding attends to itself only (an all-masked query row would make
    SDPA return NaN)."""
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    for b, row in enumerate(rows):
        n = len(row.context)
        ids[b, :n] = torch.tensor(row.context)
        positions[b, :n] = torch.arange(n)
        mask[b, :n, :n] = torch.ones((n, n), dtype=torch.bool).tril()
        start = n
        for _, tail in row.tails:
            end = start + len(tail)
            ids[b, start:end] = torch.tensor(tail)
            positions[b, start:end] = torch.arange(n, n + len(tail))
            mask[b, start:end, :n] = True
            mask[b, start:end, start:end] = torch.ones((len(tail), len(tail)), dtype=torch.bool).tril()
            start = end
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask[:, None]}


@torch.no_grad()
def loglikelihoods(model, tokenizer, prompts: list[tuple[str, list[str]]], label: str = "probe") -> list[list[float]]:
    """Per item, per choice: the summed log-probability of ' ' + choice after the context."""
    from ..training.loss import model_inputs

    rows = rows_for(tokenizer, prompts)
    found = [[0.0] * len(choices) for _, choices in prompts]
    order = sorted(range(len(rows)), key=lambda i: -rows[i].length)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    progress = Progress(len(order), label, unit="item", quiet=len(order) < 50)
    start = 0
    while start < len(order):
        width = rows[order[start]].length  # the longest of the batch (rows come longest first)
        chunk = [rows[i] for i in order[start:start + max(1, TOKENS_PER_BATCH // width)]]
        batch = {k: v.to(device) for k, v in shared_context_batch(chunk, tokenizer.pad_token_id).items()}
        logits = model(**model_inputs(model.config, batch, dtype)).logits
        # every answer token of the batch in one gather, summed per answer and read once per batch (a read
        # per answer waited for the GPU's queue each time); an answer's first token is predicted at the
        # context's last position, the others within the answer
        picks, answers = [], []  # (row, position, token, answer) per answer token; (item, choice) per answer
        for b, row in enumerate(chunk):
            offset = len(row.context)
            for choice, tail in row.tails:
                picks += [(b, offset + i - 1 if i else len(row.context) - 1, token, len(answers))
                          for i, token in enumerate(tail)]
                answers.append((row.item, choice))
                offset += len(tail)
        rows_of, positions, tokens, owners = (torch.tensor(v, device=device) for v in zip(*picks))
        picked = logits[rows_of, positions].float().log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        sums = torch.zeros(len(answers), device=device).index_add_(0, owners, picked)
        for (item, choice), value in zip(answers, sums.tolist()):
            found[item][choice] = value
        start += len(chunk)
        progress.update(start)
    model.train(was_training)
    return found
