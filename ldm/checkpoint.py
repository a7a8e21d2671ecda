"""Reading and writing checkpoints: original SD ``.ckpt``/``.safetensors`` files and our own safetensors.

Security: pickled files are read with ``torch.load(weights_only=True)``; a pickle that tries to build anything but
tensors and plain containers is refused with :class:`UnsafeCheckpointError`. The one exception is what released and
fine-tuned SD ``.ckpt`` files pickle beside their weights, Lightning 1.x callback classes and numpy types
(:data:`INERT_GLOBALS`, :data:`INERT_PREFIXES`): each is read as an :class:`Inert` stand-in that keeps its arguments
and runs nothing (the real class is never imported).

Writes go to a temporary file in the same folder, are flushed and fsynced, then renamed, so a crash never leaves a
half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The 12 schedule buffers of the original DDPM class: compared with ours on load, never loaded.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# Keys of original checkpoints that are legitimately not model weights (documented in README "Checkpoints").
IGNORED_KEYS = (*SCHEDULE_BUFFERS, "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
# the MiDaS depth estimator of SD 2 depth (512-depth-ema): a separate model that ldm does not build (logged on load)
DEPTH_MODEL_PREFIX = "depth_model."
IGNORED_PREFIXES = ("loss.", "model_ema.", DEPTH_MODEL_PREFIX)
META_CONFIG = "ldm_config"


# Globals that SD .ckpt files pickle beside the weights. PyTorch Lightning 1.x keyed the saved callback states by the
# callback's class (``"callbacks": {ModelCheckpoint: {...}}``) and the states hold numpy scalars, so the released SD v1
# files name ModelCheckpoint, ``numpy.core.multiarray.scalar`` and ``numpy.dtype`` (the whole list beyond torch's
# own: lopho/pickle_inspector's ``stable_diffusion_v1``), which torch.load(weights_only=True) refuses (diffusers#8874).
# Fine-tuned files add numpy arrays, and numpy 2's module and dtype-class names. Read as :class:`Inert` stand-ins,
# as is any other global of a file under INERT_PREFIXES (other Lightning 1.x callbacks, other numpy types) where torch
# can list the file's globals; any other global is refused.
INERT_PREFIXES = ("pytorch_lightning.callbacks.", "numpy.")
INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
    *(f"numpy.dtypes.{t}DType" for t in ("Float64", "Float32", "Float16", "Int64", "Int32", "Bool")),
)


class Inert:
    """What a global of :func:`stand_ins` unpickles to: called, instantiated or given a state, it only stores what
    it is given (``args``, ``state``); it is never a weight."""

    name = "?"

    def __new__(cls, *args: Any) -> "Inert":
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


def _stand_in(full_name: str) -> type[Inert]:
    module, _, qualname = full_name.rpartition(".")
    return type(qualname, (Inert,), {"name": full_name, "__module__": module, "__qualname__": qualname})


def stand_ins(path: Path) -> list[type[Inert]]:
    """Stand-ins for the globals of ``path`` that torch refuses and :data:`INERT_PREFIXES` covers, each allowlisted
    by its ``{__module__}.{__qualname__}``: the file's own list where torch can read it without unpickling (zip
    checkpoints, torch >= 2.6), else :data:`INERT_GLOBALS`."""
    listing = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        names = listing(str(path)) if listing else INERT_GLOBALS
    except (ValueError, RuntimeError, OSError):  # the legacy (non-zip) format; a damaged file fails in torch.load
        names = INERT_GLOBALS
    return [_stand_in(n) for n in names if n.startswith(INERT_PREFIXES)]


def inert_names(obj: Any, depth: int = 4) -> set[str]:
    """The stand-ins' names found in a loaded checkpoint's containers (keys and values, ``depth`` deep)."""
    if isinstance(obj, Inert) or (isinstance(obj, type) and issubclass(obj, Inert)):
        return {obj.name}
    if depth == 0:
        return set()
    if isinstance(obj, Mapping):
        return set().union(*(inert_names(k, depth - 1) | inert_names(v, depth - 1) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(inert_names(v, depth - 1) for v in obj))
    return set()


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint tried to run code while loading."""


def refusal(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in one line: the global it names, else its own reason."""
    text = str(e)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"{named.group(1)} is not an allowed global"
    reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return reason.group(1) if reason else text.splitlines()[0]


def load_pickle(path: Path) -> Any:
    """A pickled checkpoint's object, read with ``torch.load(weights_only=True)`` (tensors and plain containers
    only, and :class:`Inert` stand-ins from :func:`stand_ins`: a pickle that asks to build anything else is
    refused with :class:`UnsafeCheckpointError`)."""
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors or "
                              f"{', '.join(PICKLE_SUFFIXES)}")
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow(stand_ins(path)) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the pickle asks to build objects other than tensors ({refusal(e)}). "
            "Only weights are loaded (torch.load weights_only=True); convert the file to safetensors from a "
            "trusted environment if you trust its source") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e
    names = inert_names(obj)
    if names:
        log.info("%s: read %s (pickled beside the weights) as inert stand-ins", path, ", ".join(sorted(names)))
    return obj


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a flat ``{name: tensor}`` dict and the file's metadata (safetensors only; ``{}`` for pickles).

    ``.ckpt`` files that nest the weights under ``state_dict`` (Lightning) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # noqa: PLC0415

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
        return sd, meta
    return pickled_tensors(path)[0], {}


def pickled_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], Mapping]:
    """A pickled checkpoint's top-level tensors (of its ``state_dict`` when nested, as Lightning saves) and the
    mapping they came from (its other entries: nested dicts, numbers, ...)."""
    obj = load_pickle(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, obj


# keys that only other architectures' single files hold, and what they are
FOREIGN_KEYS = {
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": "SDXL",
    "conditioner.embedders.1.model.token_embedding.weight": "SDXL",
    "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": "SD3",
    "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": "FLUX",
    "double_blocks.0.img_attn.qkv.weight": "FLUX",
}


def foreign_architecture(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The name of a known non-SD-1/2 architecture whose keys ``sd`` holds (SDXL, SD3, FLUX), else None."""
    return next((name for key, name in FOREIGN_KEYS.items() if key in sd), None)


def detect_variant(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Tell SD v1 from v2 (and inpainting/depth variants) from keys and shapes.

    Returns ``{"version": "v1"|"v2", "in_channels": int, "context_dim": int, "parameterization": "eps"|"v"}``.
    A v-prediction 2.x file has the same keys as an ε one; its weights tell them apart (:func:`guess_v_prediction`).
    """
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    foreign = foreign_architecture(sd)
    if foreign:
        raise CheckpointError(f"a {foreign} checkpoint, not Stable Diffusion 1.x/2.x (the architectures this project "
                              "loads)")
    if unet_in not in sd:
        raise CheckpointError(f"not a Stable Diffusion checkpoint: key {unet_in!r} missing")
    k_attn2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    ctx = int(sd[k_attn2].shape[1]) if k_attn2 in sd else None
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd:
        version = "v1"
    elif "cond_stage_model.model.token_embedding.weight" in sd:
        version = "v2"
    elif ctx is not None:
        version = "v1" if ctx == 768 else "v2"
        log.warning("no text encoder weights in the checkpoint; guessed %s from context_dim %d", version, ctx)
    else:
        raise CheckpointError("cannot tell the SD version: no text encoder keys and no cross-attention")
    in_channels = int(sd[unet_in].shape[1])
    v = version == "v2" and in_channels == 4 and guess_v_prediction(sd)
    return {"version": version, "in_channels": in_channels, "context_dim": ctx, "parameterization": "v" if v else "eps"}


V_PRED_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def guess_v_prediction(sd: Mapping[str, torch.Tensor], threshold: float = 0.09) -> bool:
    """Whether an SD 2.x U-Net (4 input channels) was trained for v-prediction: ComfyUI's test, the population std of
    the last transformer block's first LayerNorm bias above 0.09 (the 768-px v-models are; the 512-px base and the
    inpainting/depth models, all ε, are not). A file without that key is taken for ε."""
    b = sd.get(V_PRED_PROBE)
    return b is not None and float(b.float().std(unbiased=False)) > threshold


def ema_key(param_name: str) -> str:
    """Original LitEma naming: ``diffusion_model.input_blocks.0.0.weight`` ->
    ``model_ema.diffusion_modelinput_blocks00weight``."""
    return "model_ema." + param_name.replace(".", "")


def apply_ema(sd: dict[str, torch.Tensor], model_param_names: list[str]) -> dict[str, torch.Tensor]:
    """Replace ``model.*`` weights with their ``model_ema.*`` copies (names of ``LatentDiffusion.model``'s params)."""
    missing = [n for n in model_param_names if ema_key(n) not in sd]
    if missing:
        raise CheckpointError(f"use_ema: the checkpoint has no EMA weights for {len(missing)} parameter(s), "
                              f"e.g. {ema_key(missing[0])!r}")
    out = dict(sd)
    for n in model_param_names:
        out["model." + n] = sd[ema_key(n)]
    log.info("loaded EMA weights for %d U-Net parameters", len(model_param_names))
    return out


def split_ignored(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, documented extras such as schedule buffers, ``loss.*``, ``model_ema.*``)."""
    keep, extra = {}, {}
    for k, v in sd.items():
        (extra if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES) else keep)[k] = v
    return keep, extra


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place. The file
    gets the permissions a plain ``open(path, "w")`` would give it (``mkstemp``'s are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # after write: a writer may replace the file (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full_error(path, tmp, e)
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


# a failed write with less than this left on its file system is reported as a full disk
DISK_FULL_BYTES = 16 * 2**20


def disk_full_error(path: Path, tmp: str, error: BaseException) -> OSError | None:
    """An ``ENOSPC`` error naming ``path`` when ``error`` (raised while writing its temporary file ``tmp``) came from
    a full file system, else None. torch's writer reports a full disk as "basic_ios::clear: iostream error" or
    "unexpected pos", which name neither the file nor the cause."""
    if not isinstance(error, Exception):
        return None
    with contextlib.suppress(OSError):
        written, free = os.path.getsize(tmp), shutil.disk_usage(path.parent).free
        if free < DISK_FULL_BYTES or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
            return OSError(errno.ENOSPC, f"no space left to write {str(path)!r}: {free / 2**20:.1f} MiB free under "
                           f"{str(path.parent)!r} after {written / 2**20:.1f} MiB of it were written (the partial "
                           f"file is removed; earlier files are untouched). The writer said: {error}", str(path))
    return None


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a flat state dict atomically; shared/non-contiguous tensors are copied so safetensors accepts them."""
    from safetensors.torch import save_file  # noqa: PLC0415

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def config_from_metadata(meta: Mapping[str, str]) -> dict | None:
    """The resolved config our own checkpoints carry, or None for foreign files."""
    text = meta.get(META_CONFIG)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {META_CONFIG!r} is not valid JSON ({e})") from e
