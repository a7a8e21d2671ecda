"""Prompts past 75 tokens in chunks (the web UIs' way): the cut, the padding of a batch, the context, generate."""
from __future__ import annotations

import pytest
import torch

import ldm
from ldm.conditioning.chunks import chunk_ids, chunk_rows

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
    torch.manual_seed(0)
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    with torch.no_grad():  # the zero-initialised output projections would hide the context
        for p in model.unet.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


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
