"""Changes under test that bench.py can time before any of them goes into ``ldm``: inductor settings
(``--inductor KEY=VALUE``) and patches of inductor for our graphs (``--candidate NAME``), named in the rows' variant.

A candidate patches our compiled inference graphs for the benchmark process only. It leaves this file either for
the library, measured, or for the bin, with its numbers in docs/BENCHMARKS.md. The two tuning candidates stay, though
measured slower on torch 2.11: their outcome is a property of the torch build's autotuner, to measure again on another.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from ldm.autotune import MAX_CONV_WARPS, narrow_conv_configs  # 8-warp 3x3 templates miscompute (torch#173068)

INDUCTOR_SET: dict[str, object] = {}  # --inductor settings of this run (process-wide: both sides)
OURS_SET: dict[str, object] = {}  # --ours-inductor settings of this run (our compiled inference graphs alone)
CANDIDATES_ON: list[str] = []  # --candidate patches of this run
OURS_OPTIONS: dict[str, object] = {}  # inductor settings for our compiled graphs alone (ldm.fast.optimize(options=))


def parse_inductor_option(item: str, flag: str = "--inductor") -> tuple[str, object]:
    """``KEY=VALUE`` -> (KEY, VALUE), VALUE a Python literal; a dotted KEY names a sub-config option such as
    ``triton.cudagraphs``. A key ``torch._inductor.config`` does not have or a value that is no literal is a
    ValueError naming it."""
    import ast

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
    if _config_owner(key) is None:
        raise ValueError(f"{flag}: torch._inductor.config has no option {key!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{flag} {key}: {text!r} is not a Python literal (True, 3, 'name')") from None
    return key, value


def _config_owner(key: str) -> object | None:
    """The (sub-)config object of ``torch._inductor.config`` that holds the dotted ``key``'s last part, or None."""
    import torch._inductor.config as inductor_config

    *path, leaf = key.split(".")
    target = inductor_config
    for part in path:
        target = getattr(target, part, None)
    return target if target is not None and hasattr(target, leaf) else None


def set_inductor_option(item: str) -> None:
    """``--inductor KEY=VALUE``: ``torch._inductor.config.KEY = VALUE`` for the whole process (both sides)."""
    key, value = parse_inductor_option(item)
    setattr(_config_owner(key), key.rsplit(".", 1)[-1], value)
    INDUCTOR_SET[key] = value


def set_ours_option(item: str) -> None:
    """``--ours-inductor KEY=VALUE``: the setting for our compiled inference graphs alone
    (``ldm.fast.optimize(options=)``), so that diffusers, in the same process, runs without it: an A/B test of
    one inductor option against the same reference."""
    key, value = parse_inductor_option(item, "--ours-inductor")
    OURS_OPTIONS[key] = value
    OURS_SET[key] = value


def apply_candidate(name: str) -> Callable[[], None]:
    """Patch our model with the candidate ``name`` for the rest of the process; returns the undo."""
    undo = CANDIDATES[name][1]()
    CANDIDATES_ON.append(name)
    return undo


# Triton convolution templates kept by the "conv-tune" candidate: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages). These
# won 13 of the 17 convolutions inductor's max-autotune tuned for the SD U-Net's CFG step on an H200
# (docs/results/bench-h200-2026-11-29-autotune.jsonl); all run 4 warps.
CONV_TILES = ((64, 128, 128, 4), (64, 128, 64, 4), (128, 64, 64, 4))


def conv_configs_kept(configs, tiles=CONV_TILES, max_warps: int = MAX_CONV_WARPS):
    """The convolution template configs (triton.Config: ``kwargs`` with BLOCK_M/N/K, ``num_stages``,
    ``num_warps``) whose tile is in ``tiles`` and whose warps are at most ``max_warps``. Inductor shrinks its tiles
    to small problems, so when none of the tiles is left, every config within ``max_warps`` is kept instead."""
    safe = [c for c in configs if c.num_warps <= max_warps]
    kept = [c for c in safe if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.kwargs.get("BLOCK_K"),
                                c.num_stages) in tiles]
    return kept or safe


TUNING: set[str] = set()  # what the tuning candidates on in this run autotune: "conv", "gemm"


def _tune(kind: str) -> Callable[[], None]:
    """Autotune ``kind`` ("conv" or "gemm") in our graphs: max_autotune, with Triton templates beside ATEN for the
    kinds being tuned and ATEN alone for the rest. Returns the undo."""
    TUNING.add(kind)
    _sync_ours_options()

    def undo() -> None:
        TUNING.discard(kind)
        _sync_ours_options()

    return undo


def _sync_ours_options() -> None:
    for key in ("max_autotune", "max_autotune_gemm_backends", "max_autotune_conv_backends"):
        OURS_OPTIONS.pop(key, None)
    if TUNING:
        OURS_OPTIONS.update(max_autotune=True,
                            max_autotune_gemm_backends="ATEN,TRITON" if "gemm" in TUNING else "ATEN",
                            max_autotune_conv_backends="ATEN,TRITON" if "conv" in TUNING else "ATEN")


def _conv_tune() -> Callable[[], None]:
    """Our inference graphs autotune their forward convolutions only, each among cuDNN and the :data:`CONV_TILES`
    Triton templates; matmuls stay on cuBLAS untuned, and diffusers' graphs (no max_autotune) are untouched.
    max-autotune tunes ~60 operations of the SD U-Net among ~20 choices each, over 20 minutes of compile on an
    H200; this tunes ~25 among 4. The question was how much of the templates' per-operation speed-up (1.1-2.0x
    at 64x64 and 32x32) reaches the CFG step. None on torch 2.11: 7.00 against 6.36 ms, with 124 new copies per
    step (docs/BENCHMARKS.md, fifth 11-29 session)."""
    from torch._inductor.choices import InductorChoices

    if not hasattr(InductorChoices, "get_conv_configs"):
        raise RuntimeError(f"--candidate conv-tune: torch {torch.__version__}'s inductor has no "
                           "InductorChoices.get_conv_configs to narrow")

    def select(offered: list, sizes: tuple) -> list:
        kept = conv_configs_kept(offered)
        print(f"conv-tune: {len(kept)} of {len(offered)} convolution templates kept for (M, N, K) = {sizes[:3]}",
              file=sys.stderr)  # in the log beside inductor's AUTOTUNE reports: the patch is in effect
        return kept

    undo = narrow_conv_configs(select, "conv-tune")  # process-wide, but only graphs that autotune ask it
    undo_options = _tune("conv")

    def restore() -> None:
        undo()
        undo_options()

    return restore


# Triton matmul tiles kept by the "mm-tune" candidate: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). These
# won 29 of the 42 matmuls inductor's max-autotune tuned for the SD U-Net's CFG step on an H200
# (docs/results/bench-h200-2026-11-29-autotune.jsonl). The autotuner's cuBLAS times there include its own overhead
# (30-55 us against 6-8 us in the step's profile): with this candidate the step was slower (fifth 11-29 session).
MM_TILES = ((128, 128, 64, 3, 4), (64, 64, 128, 5, 4), (128, 128, 64, 5, 8), (16, 128, 64, 5, 8),
            (16, 32, 128, 5, 2), (64, 128, 128, 4, 4), (64, 128, 64, 3, 4))
MM_FALLBACK = 4  # Triton choices kept, in inductor's order, where no tile matches (tiles shrunk to a small problem)


def mm_tile(kwargs: dict) -> tuple:
    """A Triton matmul choice's (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) from its template kwargs."""
    return tuple(kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps"))


def mm_choices_kept(choices: list, tiles=MM_TILES, fallback: int = MM_FALLBACK) -> list:
    """Of inductor's matmul KernelTemplateChoices (``template``, ``params.to_kwargs()``): every extern kernel
    (cuBLAS), and the Triton ones whose tile is in ``tiles``; where none is, the first ``fallback`` Triton ones."""
    from torch._inductor.select_algorithm import ExternKernelChoice

    extern = [c for c in choices if isinstance(c.template, ExternKernelChoice)]
    triton = [c for c in choices if not isinstance(c.template, ExternKernelChoice)]
    kept = [c for c in triton if mm_tile(c.params.to_kwargs()) in tiles]
    return extern + (kept or triton[:fallback])


def _mm_tune() -> Callable[[], None]:
    """Our inference graphs autotune their matmuls, each among cuBLAS and the :data:`MM_TILES` Triton templates
    (convolutions stay on cuDNN unless conv-tune is on too). max-autotune offers ~20 Triton matmul choices per
    operation, 5-41 s of tuning each; this offers at most 7."""
    from torch._inductor.choices import InductorChoices

    original = getattr(InductorChoices, "_finalize_template_configs", None)
    if original is None:
        raise RuntimeError(f"--candidate mm-tune: torch {torch.__version__}'s inductor has no "
                           "InductorChoices._finalize_template_configs to narrow")

    def finalize(self, template_choices, kernel_inputs, templates, op_name, *args, **kwargs) -> list:
        offered = original(self, template_choices, kernel_inputs, templates, op_name, *args, **kwargs)
        kept = mm_choices_kept(list(offered))
        print(f"mm-tune: {len(kept)} of {len(offered)} {op_name} choices kept", file=sys.stderr)
        return kept

    InductorChoices._finalize_template_configs = finalize
    undo_options = _tune("gemm")

    def restore() -> None:
        InductorChoices._finalize_template_configs = original
        undo_options()

    return restore


def _set(target: object, settings: dict[str, object]) -> None:
    for key, value in settings.items():
        setattr(target, key, value)


def _module_setting(module: str, **settings: object) -> Callable[[], Callable[[], None]]:
    """A candidate that sets module-level settings of ``module`` (``ldm.norm``'s are read when our graphs are
    traced; ``ldm.autoencoder.model.NORM_STATS`` when the autoencoder is built, which bench.py does after the
    candidates are applied); the patch returns its undo. A name the module lacks raises before anything is set."""

    def patch() -> Callable[[], None]:
        import importlib

        target = importlib.import_module(module)
        missing = [key for key in settings if not hasattr(target, key)]
        if missing:
            raise AttributeError(f"candidate setting: {module} has no {', '.join(missing)}")
        before = {key: getattr(target, key) for key in settings}
        _set(target, settings)
        return lambda: _set(target, before)

    return patch


# name -> (row-variant suffix, patch returning its undo). Each acts on our compiled inference graphs alone (those of
# TRAINING_CANDIDATES on our compiled training graphs), so only the rows of those graphs carry the suffix. Measured
# and set aside (docs/BENCHMARKS.md): gn-strided (a GroupNorm from var_mean for training graphs, fifth 11-29
# session), gn-chunked (partial sums over 64 runs of rows, channel by channel, then per group: 1.047x against
# diffusers where the default of then gave 1.079x, 12-04). gn-native: our
# inference graphs normalize with native_group_norm (as training graphs and diffusers do) instead of
# ldm.norm.group_norm_nhwc. group_norm_nhwc's statistics (ldm.norm.NHWC_STATS; the default sums four parts of the
# rows per group): gn-welford, Welford's loop; gn-shifted, the shifted sums in one reduction per group (the default
# until 12-04); gn-partial8, eight parts. The autoencoder's statistics (ldm.autoencoder.model.NORM_STATS, Welford by
# default): vae-shifted, vae-partial (a decoder A/B against diffusers in one process).
# gn-kernel: the U-Net's GroupNorms (with the SiLU after them) as a Triton torch op (ldm.kernels.group_norm, 7890eb2):
# 7.11 against 5.97 ms per CFG step on an H100 (8.08 with one program per group), removed (12-06, eleventh session).
# no-kernels, kernels-geglu, kernels-attention: ldm.kernels' Triton GEGLU and one-tile attention (7c03af9), both,
# one, the other; slower in the step than cuBLAS and cuDNN, removed (12-04, fourth session).
CANDIDATES: dict[str, tuple[str, Callable[[], Callable[[], None]]]] = {
    "conv-tune": ("_convtune", _conv_tune),
    "mm-tune": ("_mmtune", _mm_tune),
    "gn-native": ("_gnnative", _module_setting("ldm.norm", NHWC_INFERENCE=False)),
    "gn-welford": ("_gnwelford", _module_setting("ldm.norm", NHWC_STATS="welford")),
    "gn-shifted": ("_gnshifted", _module_setting("ldm.norm", NHWC_STATS="shifted")),
    "gn-partial8": ("_gnpartial8", _module_setting("ldm.norm", NHWC_STATS="partial", STATS_PARTS=8)),
    "vae-shifted": ("_vaeshifted", _module_setting("ldm.autoencoder.model", NORM_STATS="shifted")),
    "vae-partial": ("_vaepartial", _module_setting("ldm.autoencoder.model", NORM_STATS="partial")),
    "gn-nhwc-train": ("_gnnhwctrain", _module_setting("ldm.norm", NHWC_TRAINING=True)),
    "geglu-chunk": ("_gegluchunk", _module_setting("ldm.unet.attention", GEGLU_SPLIT_GRAD=False)),
    "conv-grad-any": ("_convgradany", _module_setting("ldm.unet.conv", GRAD_CHANNELS_LAST=False)),
}
# Candidates that act on our compiled training graphs (the others act on the compiled inference graphs): gn-nhwc-train,
# our training graphs normalize with ldm.norm.group_norm_nhwc, so that no gradient comes out of the norms' backward in
# NCHW (the 54 copies in convolution_backward of the H100's 512 px step). It removes them, and its backward
# reductions cost more than they did: 24.9 against 20.6 ms for two ResBlocks' step (scripts/bench_block_train.py on
# an H100, docs/BENCHMARKS.md, 12-05 fifth session); kept to measure again on another torch. Removed: conv-bwd-layout
# (torch's fake rule for convolution_backward wrapped to trace cuDNN's layout, for pytorch#171622): torch 2.11's rule
# already traces it (12-05 sixth session, fake CUDA tensors on the CPU), so the wrapper changed nothing. geglu-chunk:
# GEGLU's projection as one matmul and chunk in training graphs too (ldm.unet.attention.GEGLU_SPLIT_GRAD off), whose
# backward is a masked concatenation (triton_poi_fused_cat_gelu_gelu_backward_mul, 12.4 ms in 5 calls at the first
# level of the H100's 512 px step); the split, measured as the candidate geglu-split, is the default since 12-06.
# conv-grad-any: the U-Net's convolutions take their output's gradient in whatever layout inductor writes it
# (ldm.unet.conv.GRAD_CHANNELS_LAST off): NCHW for 25 of the 98 convolution_backward calls of SD-1.5's step on CUDA,
# each converted inside cuDNN's backward (12-06, eighth session).
TRAINING_CANDIDATES = frozenset({"gn-nhwc-train", "geglu-chunk", "conv-grad-any"})


def candidate_suffixes(graphs: str) -> list[str]:
    """The row-variant suffixes of the candidates on in this run that act on ``graphs``: "inference" or "training"
    (our compiled graphs of that kind)."""
    return [CANDIDATES[c][0] for c in CANDIDATES_ON if (c in TRAINING_CANDIDATES) == (graphs == "training")]
