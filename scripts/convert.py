#!/usr/bin/env python
"""Convert checkpoints between our (original Stable Diffusion) layout, diffusers folders and safetensors.

    python scripts/convert.py to-diffusers v1-5-pruned-emaonly.safetensors sd15-diffusers [--config YAML] [--ema]
    python scripts/convert.py from-diffusers sd15-diffusers sd15.safetensors
    python scripts/convert.py to-safetensors v1-5-pruned.ckpt v1-5-pruned.safetensors
    python scripts/convert.py merge v1-5.safetensors styled.safetensors --lora style.safetensors --lora-scale 0.8 \
        [--vae vae-ft-mse-840000-ema-pruned.ckpt] [--ema] [--fp16]
    python scripts/convert.py lora-to-kohya runs/x/lora.safetensors x-kohya.safetensors

``to-safetensors`` reads the pickle with ``torch.load(weights_only=True)`` (a pickle that tries to build anything but
tensors is refused) and writes every tensor unchanged (Lightning's ``state_dict`` nesting removed), atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("convert")


def _check_text_to_image(checkpoint: str, config: str | None) -> None:
    """Refuse, before loading, a checkpoint or config of ours that holds an autoencoder or a text encoder."""
    from ldm.cli.sample import check_model_kind, describe_target, model_target  # noqa: PLC0415
    from ldm.config import load_config  # noqa: PLC0415

    check_model_kind(checkpoint, "checkpoint")
    if config is not None and (t := model_target(load_config(config))) not in (None, "LatentDiffusion"):
        raise ValueError(f"--config {config}: describes {describe_target(t)}, not a text-to-image model")


def _check_out_dir(out_dir: str) -> None:
    """``out_dir`` is a folder or can become one (no file on its path)."""
    for p in (Path(out_dir), *Path(out_dir).parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"output folder {out_dir!r}: {str(p)!r} is an existing file, not a folder")
            return


def _load(checkpoint: str, **kwargs: Any) -> Any:
    """``ldm.load(checkpoint, **kwargs)`` (no LoRA or VAE files): an error about the file's contents names it."""
    import ldm  # noqa: PLC0415
    from ldm.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        return ldm.load(checkpoint, **kwargs)
    except CheckpointError as e:
        if str(checkpoint) in str(e):
            raise
        raise CheckpointError(f"{checkpoint}: {e}") from e


def to_diffusers(args: argparse.Namespace) -> None:
    from ldm.convert import export_diffusers  # noqa: PLC0415

    _check_out_dir(args.out_dir)
    _check_text_to_image(args.checkpoint, args.config)
    model = _load(args.checkpoint, config=args.config, use_ema=args.ema)
    if not hasattr(model, "unet"):
        raise ValueError(f"{args.checkpoint}: holds a {type(model).__name__}, not a text-to-image model")
    out = export_diffusers(model, args.out_dir)
    pipeline = json.loads((out / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    log.info("wrote %s (load with diffusers.%s.from_pretrained)", out, pipeline)


def from_diffusers(args: argparse.Namespace) -> None:
    import ldm  # noqa: PLC0415
    from ldm.convert import import_diffusers  # noqa: PLC0415

    _check_suffix(args.out, ".safetensors")
    model = import_diffusers(args.folder, variant=args.variant)
    ldm.save(model, args.out)
    log.info("wrote %s (load with ldm.load)", args.out)


def _nested_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of the tensors inside nested dicts/lists of ``obj`` (the ones a flat file cannot hold)."""
    import torch  # noqa: PLC0415

    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: list[str] = []
    for k, v in items:
        if isinstance(v, torch.Tensor):
            if prefix:  # top-level tensors are written
                out.append(f"{prefix}{k}")
        else:
            out += _nested_tensors(v, f"{prefix}{k}.")
    return out


def to_safetensors(args: argparse.Namespace) -> None:
    """Top-level tensors only (after Lightning's ``state_dict``): a file whose tensors are all nested (an SD web UI
    textual-inversion .pt, an optimizer state) is refused rather than written empty or under invented dotted names
    that no loader reads."""
    from ldm.checkpoint import pickled_tensors, save_safetensors  # noqa: PLC0415

    _check_suffix(args.out, ".safetensors")
    path = Path(args.checkpoint)
    if path.suffix == ".safetensors":
        raise SystemExit(f"error: {args.checkpoint} is already a safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    sd, obj = pickled_tensors(path)
    nested = _nested_tensors({k: v for k, v in obj.items() if k not in sd})
    if not sd:
        if "string_to_param" in obj:
            raise ValueError(f"{path}: an SD web UI textual-inversion file (its vectors are nested under "
                             "string_to_param): nothing to convert, it loads as it is (--embedding FILE, "
                             "ldm.load(embeddings=...)); nothing written")
        what = f"its {len(nested)} tensor(s) are nested, e.g. {nested[:3]}" if nested else "it holds no tensors"
        raise ValueError(f"{path}: no top-level tensors to write ({what}); nothing written")
    if nested:
        log.warning("%s: %d nested tensor(s) not written (only top-level tensors are), e.g. %s", path, len(nested),
                    nested[:3])
    save_safetensors(sd, args.out, {"format": "pt"})
    log.info("wrote %d tensors to %s", len(sd), args.out)


def merge(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415

    import ldm  # noqa: PLC0415

    _check_suffix(args.out, ".safetensors")
    if not args.lora and not args.vae:
        raise ValueError("merge: give --lora and/or --vae")
    if args.lora_scale and (not args.lora or len(args.lora_scale) not in (1, len(args.lora))):
        raise ValueError(f"merge: {len(args.lora_scale)} --lora-scale value(s) for {len(args.lora)} --lora file(s)")
    scale = args.lora_scale[0] if len(args.lora_scale) == 1 else args.lora_scale or 1.0  # one for all, or each
    model = ldm.load(args.checkpoint, config=args.config, use_ema=args.ema, lora=args.lora or None,
                     merge_lora=True, lora_scale=scale, vae=args.vae,
                     dtype=torch.float16 if args.fp16 else None)
    ldm.save(model, args.out)
    log.info("wrote %s: the original SD layout with the LoRA/VAE baked in and the config in its metadata", args.out)


def lora_to_kohya(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf  # noqa: PLC0415

    from ldm.checkpoint import config_from_metadata, read_state_dict, save_safetensors  # noqa: PLC0415
    from ldm.config import load_config  # noqa: PLC0415
    from ldm.lora_formats import KOHYA_METADATA, to_kohya  # noqa: PLC0415

    _check_suffix(args.out, ".safetensors")
    sd, meta = read_state_dict(args.lora)
    kohya = [k for k in sd if k.startswith(("lora_unet_", "lora_te_"))]
    if kohya:
        raise ValueError(f"{args.lora} is already in kohya-ss's layout ({len(kohya)} lora_unet_*/lora_te_* key(s), "
                         f"e.g. {kohya[0]!r}): nothing to convert")
    own = config_from_metadata(meta)
    if args.config:
        cfg = load_config(args.config)
    elif own is not None:
        cfg = OmegaConf.create(own)
    else:
        raise ValueError(f"{args.lora} carries no config: give --config (the YAML the LoRA was trained with)")
    try:
        kohya_sd = to_kohya(sd, cfg.model.params.unet_config.params)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{args.lora}: {e}") from None
    save_safetensors(kohya_sd, args.out, KOHYA_METADATA)
    log.info("wrote %s (kohya-ss layout: the web UIs, ComfyUI, diffusers' load_lora_weights)", args.out)


def _check_suffix(path: str, suffix: str) -> None:
    if Path(path).suffix != suffix:
        raise SystemExit(f"error: output {path!r} must end in {suffix}")


CONFIG_HELP = "YAML (default: the file's own, a sidecar .yaml, or detected)"


def _command(sub: Any, name: str, fn: Callable[[argparse.Namespace], None], summary: str, src: str,
             src_help: str | None = None, out: str = "out", out_help: str = "OUT.safetensors",
             config_help: str | None = None) -> argparse.ArgumentParser:
    """Sub-command ``name`` running ``fn``: positional ``src`` and ``out``, then ``--config`` where ``config_help``."""
    c = sub.add_parser(name, help=summary)
    c.add_argument(src, help=src_help)
    c.add_argument(out, help=out_help)
    if config_help is not None:
        c.add_argument("--config", default=None, help=config_help)
    c.set_defaults(fn=fn)
    return c


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = _command(sub, "to-diffusers", to_diffusers, "our/original SD checkpoint -> diffusers pipeline folder",
                 "checkpoint", ".ckpt or .safetensors (original SD v1/v2 or ours)", "out_dir", "folder to write",
                 CONFIG_HELP)
    a.add_argument("--ema", action="store_true", help="export the EMA weights of the U-Net")
    b = _command(sub, "from-diffusers", from_diffusers,
                 "diffusers pipeline folder -> our safetensors (original SD layout)", "folder")
    b.add_argument("--variant", default=None, help='weights variant, e.g. "fp16"')
    _command(sub, "to-safetensors", to_safetensors, ".ckpt/.pt -> .safetensors, tensors unchanged", "checkpoint")
    m = _command(sub, "merge", merge, "bake LoRA files and/or an autoencoder into a checkpoint", "checkpoint",
                 config_help=CONFIG_HELP)
    m.add_argument("--lora", action="append", default=[], help="a LoRA file (ours, kohya-ss, diffusers); repeatable")
    m.add_argument("--lora-scale", action="append", type=float, default=[], help="one for all or one per --lora")
    m.add_argument("--vae", default=None, help="an autoencoder file to replace the checkpoint's")
    m.add_argument("--ema", action="store_true", help="start from the EMA weights of the U-Net")
    m.add_argument("--fp16", action="store_true", help="write float16 weights")
    _command(sub, "lora-to-kohya", lora_to_kohya, "our lora.safetensors -> kohya-ss layout for other tools", "lora",
             config_help="YAML (default: the config in the file's metadata)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except (OSError, KeyError, ValueError, NotImplementedError, RuntimeError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
