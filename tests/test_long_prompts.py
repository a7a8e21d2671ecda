"""Prompts past 75 tokens in chunks (the web UIs' way): the cut, the padding of a batch, the context, generate."""
from __future__ import annotations

import random

import pytest
import torch

from ldm.conditioning.chunks import chunk_ids, chunk_rows
from tiny_model import tiny_with_signal

C = 9  # a stand-in comma id


def test_chunks_cut_after_a_late_comma_else_at_the_size() -> None:
    assert chunk_ids([], 5, C) == [[]]
    assert chunk_ids([1, 2, 3, 4, 5], 5, C) == [[1, 2, 3, 4, 5]]  # exactly one window
    assert chunk_ids([1, 2, 3, 4, 5, 6], 5, C) == [[1, 2, 3, 4, 5], [6]]
    assert chunk_ids([1, 2, C, 4, 5, 6, 7], 5, C, backtrack=3) == [[1, 2, C], [4, 5, 6, 7]]
    assert chunk_ids([1, C, 3, 4, 5, 6, 7], 5, C, backtrack=3) == [[1, C, 3, 4, 5], [6, 7]]  # comma too early
    ids = list(range(100, 260))
    assert sum(chunk_ids(ids, 75, C), []) == ids  # nothing lost or repeated
    V = 1000  # ids ≥ V: an embedding's vectors, kept in one chunk when they fit
    assert chunk_ids([1, 2, 3, V, V + 1, V + 2, 4], 5, C, vocab=V) == [[1, 2, 3], [V, V + 1, V + 2, 4]]
    assert chunk_ids([1, V, V + 1, V + 2, V + 3, V + 4, V + 5], 5, C, vocab=V) == [[1], [V, V + 1, V + 2, V + 3, V + 4],
                                                                                 [V + 5]]
    assert chunk_ids([V + i for i in range(7)], 5, C, vocab=V) == [[V + i for i in range(5)], [V + 5, V + 6]]
    # two embeddings side by side (ids V..V+2 and V+3..V+5): consecutive ids, but each kept whole
    assert chunk_ids([V + i for i in range(6)], 5, C, vocab=V, starts=frozenset({V, V + 3})) == [
        [V, V + 1, V + 2], [V + 3, V + 4, V + 5]]


def test_rows_fill_short_prompts_with_empty_chunks() -> None:
    rows = chunk_rows([[[5, 6], [7]], [[8]]], 6, sot=1, eot=2, pad=0)
    assert rows.tolist() == [[[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]], [[1, 8, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_with_signal()


LONG = ", ".join(f"word{i} red" for i in range(40))  # ~120 tokens


def test_short_prompts_give_the_usual_context(tiny) -> None:
    enc = tiny.cond_stage_model
    prompts = ["a red cat", "a dog"]
    assert torch.equal(enc.tokenize_long(prompts)[:, 0], enc.tokenize(prompts))
    torch.testing.assert_close(tiny.encode_text(prompts, long=True), tiny.encode_text(prompts))


def test_long_prompt_context_is_the_chunks_side_by_side(tiny) -> None:
    enc = tiny.cond_stage_model
    ids = enc.tokenize_long([LONG, "short"])  # (2, k, 77)
    assert ids.shape[0] == 2 and ids.shape[1] >= 2 and ids.shape[2] == 77
    c = tiny.encode_text([LONG, "short"], long=True)  # (2, k·77, D)
    assert c.shape[1] == 77 * ids.shape[1]
    torch.testing.assert_close(c[:, 77:154], enc.encode_tokens(ids[:, 1]))
    torch.testing.assert_close(c[1:, :77], tiny.encode_text(["short"]))  # its own chunk, then empty ones
    assert "word 3 9 red" in enc._decode(ids[0, -1].tolist())  # the end of the prompt is kept (BPE: "word", "3", "9")


def test_generate_uses_the_whole_prompt_only_when_asked(tiny) -> None:
    kw = dict(steps=3, seed=0, output="latent", progress=False, negative_prompts="blurry")
    cut = tiny.generate([LONG], **kw)
    whole = tiny.generate([LONG], long_prompts=True, **kw)
    assert torch.isfinite(whole).all() and not torch.allclose(cut, whole)
    short = tiny.generate(["a red cat"], **kw)
    torch.testing.assert_close(tiny.generate(["a red cat"], long_prompts=True, **kw), short)


def test_long_prompts_check_the_prompt_type(tiny) -> None:
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        tiny.encode_text(["a", None], long=True)


def _webui_chunks(items: list, size: int = 75, backtrack: int = 20) -> list[list[int]]:
    """The AUTOMATIC1111 web UI's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`` (no weights or BREAK),
    written out: ``items`` are token ids or ``(n, first id)`` embeddings; chunks without BOS/EOS/padding."""
    chunks, chunk, last_comma = [], [], -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for item in items:
        token = item if isinstance(item, int) else -1  # an embedding's name never begins with a comma token
        if token == C:
            last_comma = len(chunk)
        elif len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= backtrack:
            reloc, chunk = chunk[last_comma + 1:], chunk[:last_comma + 1]
            next_chunk()
            chunk = reloc
        if len(chunk) == size:
            next_chunk()
        if isinstance(item, int):
            chunk.append(item)
            continue
        n, first = item
        if len(chunk) + n > size:
            next_chunk()
        chunk += list(range(first, first + n))
    if chunk or not chunks:
        next_chunk()
    return chunks


def test_chunks_follow_the_web_ui() -> None:
    V = 1000
    ids = list(range(100, 160)) + [C] + list(range(200, 214))  # 75 tokens, a comma at 60
    assert chunk_ids(ids + [C, 5], 75, C) == [ids, [C, 5]]  # a comma after the chunk: the phrase ended with it
    assert chunk_ids(ids + [5], 75, C) == [ids[:61], ids[61:] + [5]]
    emb = list(range(V, V + 6))  # an embedding straddling the end: it moves whole, the comma is not used
    assert chunk_ids(ids[:72] + emb, 75, C, vocab=V, starts=frozenset({V})) == [ids[:72], emb]
    rng = random.Random(0)
    for _ in range(2000):
        sizes = (rng.randint(1, 8), rng.randint(1, 8))
        firsts = (V, V + sizes[0])
        items = [C if r < 0.1 else (sizes[r > 0.115], firsts[r > 0.115]) if r < 0.13 else rng.randint(10, 500)
                 for r in (rng.random() for _ in range(rng.randint(0, 240)))]
        flat = [t for it in items for t in ([it] if isinstance(it, int) else range(it[1], it[1] + it[0]))]
        assert chunk_ids(flat, 75, C, vocab=V, starts=frozenset(firsts)) == _webui_chunks(items), items
