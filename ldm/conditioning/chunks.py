"""Prompts longer than one text-encoder window, as the SD web UIs take them: the token ids are cut into chunks of at
most 75 (77 with the start and end tokens), each chunk is encoded on its own, and the contexts are concatenated
along the sequence, (B, k·77, D); cross-attention takes any context length. A cut falls after the last comma within
the final 20 tokens of a chunk when there is one, so that a phrase is not split (not when the chunk's next token is
a comma: the phrase ends with the chunk), and a textual-inversion embedding that does not fit begins the next chunk
whole (the AUTOMATIC1111 web UI's ``tokenize_line``, ``tests/test_long_prompts.py``). Rows of a batch with fewer
chunks are filled with the encoding of an empty chunk, so that a prompt and its negative prompt get the same length.
As in the web UIs, the rows of one batch share the chunk count: an image whose prompt is shorter than another's in
its batch attends to those empty chunks too, so with long prompts an image can change with its batch (sample such
prompts one at a time, or in batches of equal length, for images that do not).
"""
from __future__ import annotations

import torch


def _cut(rest: list[int], size: int, comma: int, backtrack: int, vocab: int | None, starts: frozenset[int]) -> int:
    """Where the first chunk of ``rest`` (longer than ``size``) ends, as the web UI cuts: before an embedding that
    would not fit (whole into the next chunk), else at ``size`` when the next token is a comma (the phrase ends
    with the chunk), else after the last comma in the chunk's last ``backtrack`` tokens, else at ``size``."""
    start = size
    while (vocab is not None and start > 0 and rest[start - 1] >= vocab and rest[start] == rest[start - 1] + 1
           and rest[start] not in starts):
        start -= 1  # back to the embedding's first vector
    if start < size:
        return start if start > 0 else size  # an embedding longer than a chunk is cut where it must be
    if rest[size] == comma:
        return size
    commas = [i for i in range(size - 1, max(size - 1 - backtrack, -1), -1) if rest[i] == comma]
    return commas[0] + 1 if commas else size


def chunk_ids(ids: list[int], size: int, comma: int, backtrack: int = 20, vocab: int | None = None,
              starts: frozenset[int] = frozenset()) -> list[list[int]]:
    """``ids`` cut into chunks of at most ``size`` (:func:`_cut`: the web UI's rule), never inside a
    textual-inversion embedding (consecutive ids ≥ ``vocab``, each embedding beginning at one of ``starts``) that
    fits in a chunk. An empty prompt is one empty chunk."""
    chunks: list[list[int]] = []
    rest = list(ids)
    while len(rest) > size:
        cut = _cut(rest, size, comma, backtrack, vocab, starts)
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    return chunks


def chunk_rows(chunks: list[list[list[int]]], length: int, sot: int, eot: int, pad: int) -> torch.Tensor:
    """Per prompt, its chunks of ids → (B, k, length): sot, ids, eot, then ``pad``; k the most chunks of any
    prompt, the others filled with empty chunks (sot, eot, pad…)."""
    k = max(len(c) for c in chunks)
    out = torch.full((len(chunks), k, length), pad, dtype=torch.long)
    for i, prompt in enumerate(chunks):
        for j in range(k):
            row = [sot, *(prompt[j] if j < len(prompt) else []), eot]
            out[i, j, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def weight_rows(weights: list[list[list[float]]], length: int) -> torch.Tensor:
    """Per prompt, the weights of its chunks' ids (as :func:`chunk_rows` lays out the ids) → (B, k, length) float32:
    1 for the start and end tokens, the padding and the empty chunks that fill a shorter prompt."""
    k = max(len(c) for c in weights)
    out = torch.ones(len(weights), k, length)
    for i, prompt in enumerate(weights):
        for j, chunk in enumerate(prompt):
            out[i, j, 1: 1 + len(chunk)] = torch.tensor(chunk, dtype=torch.float32)
    return out


def split_like(values: list, chunks: list[list]) -> list[list]:
    """``values`` cut into runs of the lengths of ``chunks`` (the weights of :func:`chunk_ids`'s chunks)."""
    out, at = [], 0
    for chunk in chunks:
        out.append(values[at: at + len(chunk)])
        at += len(chunk)
    return out
