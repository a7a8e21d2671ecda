"""Prompt emphasis (the AUTOMATIC1111 web UI's syntax): the parser, the weighted tokens, the weighted context,
generate and scripts/sample.py."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import ldm
from ldm.cli.sample import main
from ldm.conditioning.emphasis import apply_emphasis, parse_emphasis
from tiny_model import tiny_with_signal

# the web UI's own examples (the docstring of its parse_prompt_attention), and the escapes and breaks
EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("[faded] (red:0.5) [[x]]", [("faded", 1 / 1.1), (" ", 1.0), ("red", 0.5), (" ", 1.0), ("x", 1 / 1.21)]),
    ("a) b] c :2) d", [("a) b] c :2) d", 1.0)]),  # closing brackets without an opening one are text
    (r"\\ and \[x\]", [("\\ and [x]", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", None), ("b", 1.1)]),
    ("abreak BREAKfast", [("abreak BREAKfast", 1.0)]),  # BREAK only as a word of its own
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", EXAMPLES)
def test_parse_gives_the_web_uis_runs_and_weights(text, expected) -> None:
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == [None if w is None else pytest.approx(w, rel=1e-12) for _, w in expected]


def test_a_weight_that_is_not_a_number_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'1\.2\.3' is not a weight"):
        parse_emphasis("a (cat:1.2.3) here")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_with_signal()
    # a trained encoder's final LayerNorm: an untrained one (weight 1, bias 0) gives states of mean ~1e-8, where
    # "original" emphasis, which divides by the weighted states' mean, is ill-defined
    with torch.no_grad():
        model.cond_stage_model.model.ln_final.bias.normal_(0.1, 0.3)
    return model


def test_each_token_carries_its_runs_weight(tiny) -> None:
    enc = tiny.cond_stage_model
    ids, w = enc.tokenize_weighted(["a (red:1.5) cat", "[dog], (big)"])
    assert torch.equal(ids, enc.tokenize_long(["a red cat", "dog, big"]))  # brackets take no token
    assert w.shape == ids.shape == (2, 1, 77) and w.dtype == torch.float32
    assert w[0, 0, :6].tolist() == pytest.approx([1, 1, 1.5, 1, 1, 1])  # sot a red cat eot pad
    assert w[1, 0, :6].tolist() == pytest.approx([1, 1 / 1.1, 1, 1.1, 1, 1])  # sot dog , big eot pad
    assert torch.all(w[:, :, 6:] == 1)


def test_break_ends_a_chunk(tiny) -> None:
    enc = tiny.cond_stage_model
    ids, w = enc.tokenize_weighted(["(a:2) BREAK b", "a BREAK", "BREAK a"])
    one = enc.tokenize(["a", "b"])  # (2, 77): sot a eot pad…, sot b eot pad…
    empty = enc.tokenize([""])[0]
    assert ids.shape == (3, 2, 77)
    assert torch.equal(ids[0], one) and w[0, 0, 1] == 2 and torch.all(w[0, 1] == 1)
    assert torch.equal(ids[1, 0], one[0]) and torch.equal(ids[1, 1], empty)  # a BREAK at the end adds no chunk:
    assert torch.equal(ids[2, 0], empty) and torch.equal(ids[2, 1], one[0])  # row 1's second is the batch's filler


def test_a_long_weighted_prompt_is_cut_where_the_long_prompt_is(tiny) -> None:
    enc = tiny.cond_stage_model
    words = [f"word{i} red" for i in range(40)]  # ~120 tokens
    ids, w = enc.tokenize_weighted(", ".join(f"({x}:1.2)" if i % 3 == 0 else x for i, x in enumerate(words)))
    assert torch.equal(ids, enc.tokenize_long(", ".join(words)))
    assert ids.shape[1] > 1 and w.unique().tolist() == pytest.approx([1.0, 1.2])


def test_prompts_without_brackets_give_the_long_prompt_context_exactly(tiny) -> None:
    enc = tiny.cond_stage_model
    prompts = ["a red cat", ", ".join(f"word{i} red" for i in range(40)), ""]
    for mode in ("original", "no_norm"):
        assert torch.equal(enc.encode_weighted(prompts, mode=mode), enc.encode_long(prompts))


def test_weights_scale_their_tokens_and_original_restores_each_rows_mean(tiny) -> None:
    enc = tiny.cond_stage_model
    z = enc.encode_long(["a red cat", "a dog"])  # (2, 77, D): the same ids as the weighted prompts below
    prompts = ["a (red:1.5) cat", "a [dog]"]
    raw = enc.encode_weighted(prompts, mode="no_norm")
    scale = torch.ones(2, 77, 1)
    scale[0, 2], scale[1, 2] = 1.5, 1 / 1.1
    torch.testing.assert_close(raw, z * scale)  # token i's hidden state times its weight, the rest as they were
    out = enc.encode_weighted(prompts)  # "original"
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))  # each prompt's mean, restored
    ratio = out / raw  # one factor per prompt: mean(z) / mean(z ⊙ w)
    torch.testing.assert_close(ratio, (z.mean(dim=(1, 2)) / raw.mean(dim=(1, 2)))[:, None, None].expand_as(ratio))


def test_a_prompt_is_weighted_alike_alone_and_in_a_batch(tiny) -> None:
    enc = tiny.cond_stage_model
    alone = enc.encode_weighted(["a (red:1.5) cat"])
    batch = enc.encode_weighted(["a (red:1.5) cat", "(((dog))), [[grass]]"])  # one chunk each
    torch.testing.assert_close(batch[:1], alone)


def test_a_weighted_mean_of_zero_is_left_unscaled() -> None:
    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (2, 2, 2): means 0 and 1
    w = torch.ones(2, 2)
    assert torch.equal(apply_emphasis(z, w), z)  # no 0/0 in the first row
    w[:, 1] = 2.0
    torch.testing.assert_close(apply_emphasis(z, w), torch.tensor([[[1.0, -1.0], [4.0, -4.0]],
                                                                   [[2 / 3, 2 / 3], [4 / 3, 4 / 3]]]))


def test_half_precision_states_are_weighted_in_float32() -> None:
    z = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]], dtype=torch.float16)  # (1, 2, 2), mean 4
    w = torch.tensor([[1.0, 2.0]])
    out = apply_emphasis(z, w)  # z ⊙ w = [[1, 3], [10, 14]], mean 7: × 4/7
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.tensor([[[1.0, 3.0], [10.0, 14.0]]]) * 4 / 7, rtol=1e-3, atol=0)
    torch.testing.assert_close(apply_emphasis(z, w, "no_norm").float(), torch.tensor([[[1.0, 3.0], [10.0, 14.0]]]))


def test_a_textual_inversion_name_takes_its_brackets_weight(tiny) -> None:
    enc = copy.deepcopy(tiny.cond_stage_model)
    enc.add_embedding("mystyle", torch.randn(3, enc.width))
    ids, w = enc.tokenize_weighted(["a cat, (mystyle:1.3)"])
    V = enc.model.vocab_size
    at = (ids[0, 0] >= V).nonzero().flatten().tolist()
    assert len(at) == 3 and w[0, 0, at].tolist() == pytest.approx([1.3] * 3)
    assert torch.all(w[0, 0, : at[0]] == 1) and torch.all(w[0, 0, at[-1] + 1:] == 1)


def test_generate_weights_prompts_only_when_asked(tiny) -> None:
    kw = dict(steps=2, seed=0, output="latent", progress=False, sampler="euler")
    plain = tiny.generate("a (red:1.5) cat", **kw)
    long = tiny.generate("a (red:1.5) cat", long_prompts=True, **kw)
    weighted = tiny.generate("a (red:1.5) cat", emphasis="original", **kw)
    unbracketed = tiny.generate("a red cat", emphasis="original", **kw)
    assert not torch.allclose(weighted, unbracketed)  # the weight reaches the U-Net
    torch.testing.assert_close(unbracketed, tiny.generate("a red cat", long_prompts=True, **kw), rtol=0, atol=0)
    torch.testing.assert_close(plain, long, rtol=0, atol=0)  # without emphasis the brackets are text
    negative = tiny.generate("a cat", negative_prompts="(blurry:1.4)", emphasis="no_norm", **kw)
    assert not torch.allclose(negative, tiny.generate("a cat", negative_prompts="blurry", emphasis="no_norm", **kw))


def test_unknown_modes_and_encoders_without_emphasis_are_refused_by_name(tiny) -> None:
    with pytest.raises(ValueError, match="emphasis='strong'"):
        tiny.encode_text(["a cat"], emphasis="strong")
    with pytest.raises(ValueError, match="emphasis='strong'"):
        tiny.cond_stage_model.encode_weighted(["a cat"], mode="strong")
    model = copy.deepcopy(tiny)

    class Plain(torch.nn.Module):  # a text encoder with neither chunks nor weights
        def forward(self, prompts):
            return torch.zeros(len(prompts), 77, 64)

    model.cond_stage_model = Plain()
    with pytest.raises(ValueError, match="Plain cannot weight prompts"):
        model.encode_text(["a (cat:2)"], emphasis="original")


def test_the_cli_passes_emphasis_and_records_it(tiny, tmp_path, monkeypatch) -> None:
    import ldm.pipeline

    ckpt = ldm.save(tiny, tmp_path / "tiny.safetensors")
    seen = []
    real = ldm.pipeline.generate
    monkeypatch.setattr(ldm.pipeline, "generate", lambda *a, **k: seen.append(k) or real(*a, **k))
    base = ["--checkpoint", str(ckpt), "--prompt", "a (red:1.5) cat", "--steps", "1", "--dtype", "fp32"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--emphasis", "no_norm"]) == 0
    assert seen[0]["emphasis"] is None and seen[1]["emphasis"] == "no_norm"
    texts = [Image.open(tmp_path / d / "00000-0.png").text["parameters"] for d in "ab"]
    assert "Emphasis" not in texts[0] and "Emphasis: no_norm" in texts[1]
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "c"), "--emphasis", "strong"])
