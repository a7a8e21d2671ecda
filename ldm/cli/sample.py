"""``ldm-sample`` / ``python scripts/sample.py``: txt2img, img2img and inpainting from the shell.

    python scripts/sample.py --checkpoint runs/demo/unet/model.safetensors --prompt "cat face, flat emoji" --n 4
    python scripts/sample.py --checkpoint v1-5.safetensors --prompts-file prompts.txt --sampler euler_a --steps 30
    python scripts/sample.py --checkpoint sd.ckpt --init-image in.png --strength 0.6 --prompt "oil painting"
    python scripts/sample.py --checkpoint sd.ckpt --init-image in.png --mask mask.png --prompt "a red hat"
    python scripts/sample.py --checkpoint v1-5.safetensors --prompts-file prompts.txt --compile   # compiled U-Net

Writes one PNG per image with its generation parameters in the PNG text chunk ``parameters`` (the format common
tools read: prompt, ``Negative prompt:``, then ``Steps, Sampler, CFG scale, Seed, Size, Model hash, Version``), and
a grid image. Arguments are checked before any model loads.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("ldm.sample")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ldm.conditioning.emphasis import EMPHASIS_MODES  # noqa: PLC0415
    from ldm.diffusion.samplers import SAMPLERS  # noqa: PLC0415
    from ldm.diffusion.schedules import SIGMA_KINDS  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help=".safetensors/.ckpt (ours or released SD)")
    p.add_argument("--config",
                   help="YAML (ours or an original SD inference YAML); optional when the checkpoint says enough")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--long-prompts", action="store_true",
                   help="encode prompts past 75 tokens in chunks (the web UIs' way) instead of truncating them; "
                        "a batch's prompts share the chunk count, so an image can change with its batch")
    p.add_argument("--emphasis", choices=EMPHASIS_MODES, default=None,
                   help="read prompts in the web UI's emphasis syntax: (text) x1.1, [text] /1.1, (text:1.3) x1.3, "
                        "\\( a literal bracket, BREAK a new 75-token chunk; 'original' restores each chunk's mean "
                        "after weighting (the web UI's default), 'no_norm' does not (default: prompts read literally)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--sigmas", default="auto", choices=["auto", *SIGMA_KINDS])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM η / ancestral noise scale (default: the sampler's own, 0 for ddim, 1 for euler_a, "
                        "dpmpp_2s_a and dpmpp_2m_sde)")
    p.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    p.add_argument("--height", type=int, help="pixels (default: the model's size; with --init-image, the image's)")
    p.add_argument("--width", type=int, help="pixels (default: the model's size; with --init-image, the image's)")
    p.add_argument("--init-image", help="img2img / inpainting source image")
    p.add_argument("--mask", help="inpainting mask (white = repaint; with transparency: opaque = repaint), resized "
                   "to the output size; its aspect ratio must be the init image's")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting: the fraction of the schedule re-noised (default 0.8; needs "
                        "--init-image)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--vae", metavar="FILE", help="a separate autoencoder file (e.g. vae-ft-mse-840000-ema-pruned)")
    p.add_argument("--clip-skip", type=int, metavar="N", help="1: the text encoder's last layer, 2: the penultimate")
    p.add_argument("--embedding", action="append", default=[], metavar="[NAME=]FILE",
                   help="a textual-inversion file; its name (given, else diffusers' <token>, else the file's stem) "
                        "in a prompt stands for its vectors; repeatable")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a LoRA file (ours, kohya-ss or diffusers); repeatable")
    p.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                   help="strength of the LoRA files: one for all or one per --lora (default 1)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, choices=COMPILE_MODES,
                   metavar="MODE", help="compile the U-Net and decoder first (ldm.fast.optimize) with this "
                   "torch.compile mode, reduce-overhead (CUDA graphs) if none is named; the first batch compiles "
                   "(about 35 s for SD-1.5 on an H200), a later run reuses inductor's cache; a last, smaller batch "
                   "compiles once more")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="no compiler: replay the eager U-Net and text encoder from a CUDA graph per batch shape "
                        "(ldm.fast.optimize(compile=False, unet_graph=True)); the default on a GPU without "
                        "--compile (SD-1.5 txt2img on an H200: 0.52 s against 1.68 s eager, the same pixels); "
                        "--no-cuda-graph samples eager")
    p.add_argument("--attention", default=None, metavar="BACKEND",
                   help="the U-Net's attention backend (sdpa, cudnn, flash, xformers, fa4, math; default: the "
                        "checkpoint config's): e.g. fa4 for FlashAttention-4 on Hopper and Blackwell cards")
    p.add_argument("--out", default="outputs", help="output folder")
    return p.parse_args(argv)


def _check_files(a: argparse.Namespace) -> None:
    for name in ("checkpoint", "init_image", "mask", "prompts_file", "vae"):
        v = getattr(a, name)
        if v and not Path(v).is_file():
            raise ValueError(f"--{name.replace('_', '-')}: file {v!r} not found")
    for flag, files in (("--lora", a.lora), ("--embedding", [f for _, f in embedding_args(a.embedding)])):
        for f in files:
            if not Path(f).is_file():
                raise ValueError(f"{flag}: file {f!r} not found")
    if len(a.lora_scale) not in (0, 1, len(a.lora)) or (a.lora_scale and not a.lora):
        raise ValueError(f"--lora-scale: {len(a.lora_scale)} value(s) for {len(a.lora)} --lora file(s)")
    if a.mask and not a.init_image:
        raise ValueError("--mask needs --init-image")


def _check_numbers(a: argparse.Namespace) -> None:
    from ldm.pipeline import SEED_LIMIT  # noqa: PLC0415

    if a.steps <= 0:
        raise ValueError(f"--steps must be positive, got {a.steps}")
    if a.n <= 0 or a.batch_size <= 0:
        raise ValueError("--n and --batch-size must be positive")
    if a.clip_skip not in (None, 1, 2):
        raise ValueError(f"--clip-skip must be 1 or 2, got {a.clip_skip}")
    for name in ("guidance", "guidance_rescale", "eta", "strength"):
        if getattr(a, name) is not None and not math.isfinite(getattr(a, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number")
    if not all(math.isfinite(s) for s in a.lora_scale):
        raise ValueError("--lora-scale must be a finite number")
    ranges = (("guidance_rescale", 0 <= a.guidance_rescale <= 1, "in [0, 1]"),
              ("eta", a.eta is None or a.eta >= 0, ">= 0"),
              ("strength", a.strength is None or 0 < a.strength <= 1, "in (0, 1]"),
              ("seed", abs(a.seed) < SEED_LIMIT, f"below 2**{SEED_LIMIT.bit_length() - 1} in magnitude "
               "(torch's generators take 64-bit seeds)"))
    for name, ok, what in ranges:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(a, name)}")
    if a.strength is not None and not a.init_image:
        raise ValueError("--strength applies to img2img and inpainting: it needs --init-image")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and (v <= 0 or v % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {v}")


SAMPLING_DEVICES = ("cpu", "cuda", "mps", "xpu")
ASPECT_TOLERANCE = 0.02  # a mask of the init image scaled and rounded to whole pixels keeps its aspect within this


def check_device(spec: str | None, flag: str = "--device") -> str:
    """``spec`` checked (a torch device this machine has), or the default: cuda if available, else cpu."""
    import torch  # noqa: PLC0415

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag} {spec}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type not in SAMPLING_DEVICES:
        raise ValueError(f"{flag} {spec}: not a device to run a model on (cpu, cuda, cuda:N, mps, xpu)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        if backend is None or not backend.is_available():
            raise ValueError(f"{flag} {spec}: no {dev.type} device is available")
    return spec


TEXT_ENCODERS = ("OpenCLIPTextEncoder", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "HFTextEncoder")


def model_target(cfg: Any) -> str | None:
    """The short class name a config's ``model.target`` names (original SD class paths mapped to ours), or None."""
    from ldm.registry import LDM_ALIASES  # noqa: PLC0415

    try:
        target = str(cfg["model"]["target"])
    except (KeyError, TypeError):
        return None
    return LDM_ALIASES.get(target, target).rsplit(".", 1)[-1]


def describe_target(target: str) -> str:
    """"an autoencoder (AutoencoderKL)" and the like, for messages."""
    if target == "AutoencoderKL":
        return "an autoencoder (AutoencoderKL)"
    if target in TEXT_ENCODERS:
        return f"a text encoder / CLIP model ({target})"
    if target == "LatentDiffusion":
        return "a text-to-image model (LatentDiffusion)"
    return f"a {target}"


def file_target(path: str | Path) -> str | None:
    """The model class a checkpoint of ours says it holds (read from its safetensors header alone, no weights
    loaded); None for a file that does not say (foreign files, pickles, unreadable headers: the loader reports
    those)."""
    from ldm.checkpoint import config_from_metadata  # noqa: PLC0415

    if Path(path).is_dir():
        return "LatentDiffusion" if (Path(path) / "model_index.json").is_file() else None
    if Path(path).suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return model_target(config_from_metadata(meta))
    except Exception:  # noqa: BLE001 (a corrupt header: ldm.load names the file and the problem)
        return None


def check_model_kind(path: str | Path, flag: str, want: str | tuple[str, ...] = "LatentDiffusion",
                     what: str | None = None) -> None:
    """Refuse (ValueError) a file of ours whose embedded config builds a class not in ``want``."""
    wants = (want,) if isinstance(want, str) else want
    target = file_target(path)
    if target is not None and target not in wants:
        raise ValueError(f"{flag} {path}: the file holds {describe_target(target)}, not "
                         f"{what or ' or '.join(describe_target(w) for w in wants)}")


def _check_models(a: argparse.Namespace) -> None:
    """--checkpoint, --config and --vae hold what they should (headers and YAML only: no weights loaded)."""
    if a.config:
        from ldm.config import load_config  # noqa: PLC0415

        target = model_target(load_config(a.config))
        if target is not None and target != "LatentDiffusion":
            raise ValueError(f"--config {a.config}: describes {describe_target(target)}, not a text-to-image model "
                             "(LatentDiffusion)")
    if a.checkpoint:
        check_model_kind(a.checkpoint, "--checkpoint")
    if a.vae:
        # an autoencoder, or a whole text-to-image model whose autoencoder is taken (as ldm.load(vae=...) does)
        check_model_kind(a.vae, "--vae", ("AutoencoderKL", "LatentDiffusion"))


def _check_out(a: argparse.Namespace) -> None:
    """--out is a folder or can become one (no existing file on its path)."""
    from ldm.cli.paths import folder_problem  # noqa: PLC0415

    if problem := folder_problem(a.out):
        raise ValueError(f"--out {a.out}: {problem}")


def load_images(a: argparse.Namespace) -> tuple[Any, Any]:
    """--init-image and --mask, decoded now (before the model loads), each failure naming its file. A mask of
    another aspect ratio than the init image would be stretched over it (repainting another region than drawn):
    refused."""
    from ldm.pipeline_io import open_image  # noqa: PLC0415

    init = open_image(a.init_image, "--init-image") if a.init_image else None
    mask = mask_from_alpha(open_image(a.mask, "--mask"), a.mask) if a.mask else None
    if init is not None and mask is not None and init.size != mask.size:
        (iw, ih), (mw, mh) = init.size, mask.size
        if abs((mw / mh) / (iw / ih) - 1) > ASPECT_TOLERANCE:
            raise ValueError(f"--mask {a.mask}: {mw}x{mh} does not have the aspect ratio of --init-image "
                             f"{a.init_image} ({iw}x{ih}); it would be stretched over the image")
        log.info("--mask %s: %dx%d, resized to the output size", a.mask, mw, mh)
    return init, mask


def mask_from_alpha(mask: Any, path: str) -> Any:
    """A mask with transparency is its alpha channel (opaque = repaint), as the web UIs read a mask painted over a
    transparent layer; its colours say nothing there (a transparent white background would repaint everything).
    A mask without transparency is returned as it is (white = repaint)."""
    if mask.mode not in ("RGBA", "LA", "PA") and "transparency" not in mask.info:
        return mask
    alpha = mask.convert("RGBA").getchannel("A")
    if alpha.getextrema() == (255, 255):
        return mask
    log.info("--mask %s: has transparency; its alpha channel is the mask (opaque = repaint)", path)
    return alpha


def output_size(a: argparse.Namespace, init: Any, factor: int) -> tuple[int | None, int | None]:
    """(height, width) to sample: --height / --width, else the init image's size rounded down to a multiple of the
    autoencoder's ``factor`` (as the original img2img script and diffusers do; the model's size would stretch an
    image of another aspect ratio), else None (the model's size)."""
    if init is None or (a.height and a.width):
        return a.height, a.width
    w, h = (v - v % factor for v in init.size)
    if min(w, h) <= 0:
        raise ValueError(f"--init-image {a.init_image}: {init.size[0]}x{init.size[1]} is smaller than {factor} px, "
                         "the autoencoder's factor; give --height and --width")
    if (w, h) != init.size and not (a.height or a.width):
        log.info("--init-image %s: %dx%d sampled at %dx%d (multiples of %d)", a.init_image, *init.size, w, h, factor)
    return a.height or h, a.width or w


def read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of ``path`` (UTF-8), stripped; a file that is not UTF-8 text is a ValueError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


IMAGE_NAME = re.compile(r"(\d{5,})-.*\.png")


def first_free_index(out: Path) -> int:
    """One past the highest NNNNN of the NNNNN-SEED.png files in ``out`` (0 for a new folder): a later run into the
    same folder continues the numbering instead of overwriting the earlier images."""
    found = [int(m.group(1)) for p in out.glob("*.png") if (m := IMAGE_NAME.fullmatch(p.name))]
    return max(found, default=-1) + 1


def grid_path(out: Path, first: int) -> Path:
    """``grid.png``, or ``grid-NNNNN.png`` (this run's first image number) when the folder has one already."""
    return out / "grid.png" if not (out / "grid.png").exists() else out / f"grid-{first:05d}.png"


def check_args(a: argparse.Namespace) -> list[str]:
    """Validate everything cheap before a model loads; returns the prompt list."""
    if not a.checkpoint and not a.config:
        raise ValueError("give --checkpoint and/or --config")
    if a.compile and a.cuda_graph:
        raise ValueError("--cuda-graph replays the eager U-Net instead of compiling it: give --compile or --cuda-graph")
    if a.attention is not None:
        from ldm.attention import check_backend  # noqa: PLC0415

        check_backend(a.attention)
    _check_files(a)
    _check_numbers(a)
    _check_out(a)
    a.device = check_device(a.device)
    _check_models(a)
    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += read_prompts_file(a.prompts_file)
    if not prompts:
        raise ValueError("no prompt: use --prompt or --prompts-file")
    return [p for p in prompts for _ in range(a.n)]


def file_hash(path: str | None) -> str:
    if not path:
        return "random"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def embedding_args(values: list[str]) -> list[tuple[str | None, str]]:
    """``--embedding`` values → (name, file): "NAME=FILE", or a file named as ``ldm.load`` names it (None)."""
    out: list[tuple[str | None, str]] = []
    for v in values:
        name, eq, f = v.partition("=")
        out.append((None, v) if not eq or Path(v).is_file() else (name, f))
    return out


def lora_text(a: argparse.Namespace) -> str:
    """"name.safetensors:0.8, other.safetensors:1" for the PNG metadata."""
    scales = a.lora_scale if len(a.lora_scale) > 1 else (a.lora_scale or [1.0]) * len(a.lora)
    return ", ".join(f"{Path(f).name}:{s:g}" for f, s in zip(a.lora, scales))


def _optional_settings(a: argparse.Namespace) -> list[str]:
    """The "Key: value" items of the settings that were given."""
    items = [("Eta", a.eta if a.eta is not None else None), ("LoRA", lora_text(a) if a.lora else None),
             ("VAE", Path(a.vae).name if a.vae else None), ("Clip skip", a.clip_skip),
             ("Denoising strength", a.strength if a.init_image else None), ("Emphasis", a.emphasis),
             ("Guidance rescale", a.guidance_rescale or None), ("Long prompts", True if a.long_prompts else None)]
    return [f"{k}: {v}" for k, v in items if v is not None]


def parameters_text(prompt: str, negative: str | None, a: argparse.Namespace, seed: int, size: tuple[int, int],
                    model_hash: str) -> str:
    from ldm import __version__  # noqa: PLC0415

    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join([f"Steps: {a.steps}, Sampler: {a.sampler}, Schedule: {a.sigmas}, CFG scale: {a.guidance}, "
                            f"Seed: {seed}, Size: {size[0]}x{size[1]}, Model hash: {model_hash}, "
                            f"Version: ldm {__version__}", *_optional_settings(a)]))
    return "\n".join(lines)


def fast_path(a: argparse.Namespace, device_type: str) -> dict[str, Any] | None:
    """``ldm.fast.optimize``'s arguments for --compile / --cuda-graph on ``device_type``, or None to sample eager.
    On a GPU without --compile the eager U-Net replays from CUDA graphs unless --no-cuda-graph is given."""
    graph = a.cuda_graph if a.cuda_graph is not None else (device_type == "cuda" and not a.compile)
    if device_type != "cuda":
        # as with --compile, the flag is accepted and only its CUDA-graph part does not apply off a GPU
        if graph:
            log.warning("--cuda-graph: CUDA graphs need a GPU; on %s the U-Net runs eager (the flag has no effect "
                        "here)", device_type)
            return None
        if a.compile in ("reduce-overhead", "max-autotune"):
            log.warning("--compile %s: on %s the model is compiled without CUDA graphs (they need a GPU)",
                        a.compile, device_type)
    if a.compile:
        return dict(mode=a.compile)
    return dict(compile=False, unet_graph=True) if graph else None


def run(argv: list[str] | None = None) -> list[Path]:
    import torch  # noqa: PLC0415
    from PIL import PngImagePlugin  # noqa: PLC0415

    import ldm  # noqa: PLC0415
    from ldm.grid import make_grid  # noqa: PLC0415
    from ldm.pipeline import DEFAULT_STRENGTH  # noqa: PLC0415
    from ldm.pipeline_io import save_png  # noqa: PLC0415

    a = parse_args(argv)
    prompts = check_args(a)
    init, mask = load_images(a)
    if init is not None and a.strength is None:
        a.strength = DEFAULT_STRENGTH  # generate's default, named in the PNGs' parameters
    device = a.device
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        a.dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    model = ldm.load(a.checkpoint, a.config, device=device, dtype=dtype, use_ema=a.ema, lora=a.lora or None,
                     lora_scale=a.lora_scale[0] if len(a.lora_scale) == 1 else a.lora_scale or 1.0, vae=a.vae,
                     clip_skip=a.clip_skip,
                     embeddings=embedding_args(a.embedding) or None)
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"--checkpoint {a.checkpoint or a.config}: {describe_target(type(model).__name__)} was "
                         "loaded, not a text-to-image model")
    if a.attention is not None:
        model.unet.set_attention_backend(a.attention)
    fast = fast_path(a, torch.device(device).type)
    if fast is not None:
        from ldm.fast import optimize  # noqa: PLC0415

        optimize(model, **fast)
    height, width = output_size(a, init, model.vae.downsample_factor)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mhash, paths, images, first = file_hash(a.checkpoint), [], [], first_free_index(out)
    for start in range(0, len(prompts), a.batch_size):
        chunk = prompts[start:start + a.batch_size]
        imgs = model.generate(chunk, negative_prompts=a.negative_prompt, sampler=a.sampler, steps=a.steps,
                              guidance=a.guidance, guidance_rescale=a.guidance_rescale, seed=a.seed + start,
                              height=height, width=width, eta=a.eta, init_image=init, strength=a.strength,
                              mask=mask, sigmas=a.sigmas, long_prompts=a.long_prompts, emphasis=a.emphasis)
        for i, (p, im) in enumerate(zip(chunk, imgs)):
            seed = a.seed + start + i
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", parameters_text(p, a.negative_prompt, a, seed, im.size, mhash))
            path = out / f"{first + len(paths):05d}-{seed}.png"
            save_png(im, path, pnginfo=info)
            paths.append(path)
            images.append(im)
    grid = grid_path(out, first)
    save_png(make_grid(images, captions=prompts), grid)
    log.info("wrote %d images (%s to %s) and %s", len(paths), paths[0].name, paths[-1].name, grid)
    return paths


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ldm.attention import AttentionBackendError  # noqa: PLC0415
    from ldm.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        run(argv)
    except (ValueError, OSError, CheckpointError, AttentionBackendError, NotImplementedError) as e:
        # bad input named in one line (ConfigError is a ValueError; FileNotFoundError, PermissionError are OSErrors)
        log.error("%s", str(e).strip().replace("\n", " "))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
