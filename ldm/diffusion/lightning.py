"""Stage 2: train the U-Net of a latent diffusion model (frozen autoencoder; frozen text encoder unless
``model.params.cond_stage_trainable``, :mod:`ldm.diffusion.joint_text`).

The math lives in :mod:`ldm.diffusion.losses`; this module wires it to Lightning: manual optimization through
:func:`ldm.training.guard.guarded_step`, EMA, caption dropout, latent-scale measurement, LoRA, per-step seeded noise
(so a resumed run draws exactly the noise the uninterrupted one would have).
"""
from __future__ import annotations

import functools
import json
import logging
import time
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.autotune import guard_conv_templates
from ldm.diffusion.inversion import add_trainable_word, inversion_settings, strip_inversion, write_embedding
from ldm.diffusion.inversion import captions as inversion_captions
from ldm.diffusion.joint_text import check_joint_text_config, text_encoder_trainable, unfreeze_text_encoder
from ldm.ema import EMA
from ldm.lr_schedule import advance
from ldm.registry import ConfigError
from ldm.training.datamodule import check_buckets
from ldm.training.guard import StepGuard, guarded_step
from ldm.training.modes import eval_mode
from ldm.training.optim import build_optimizer, step_generator
from ldm.training.sharding import full_state_dict, is_sharding
from ldm.training.stage import ResumableStage
from ldm.training.step_log import batches_per_step, closes_window, log_step

log = logging.getLogger(__name__)
# torch.compile modes that replay the compiled graphs from CUDA graphs
GRAPH_MODES = ("reduce-overhead", "max-autotune")


class LatentDiffusionModule(ResumableStage, L.LightningModule):
    """Trains ``net.model`` (the U-Net, or its LoRA adapters) of a :class:`ldm.model.LatentDiffusion`."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__()
        from ldm.loading import build, load  # noqa: PLC0415

        self.config = config
        t = config.train
        self.automatic_optimization = False
        init = t.get("init_checkpoint")
        if t.get("init_use_ema", False) and not init:
            raise ConfigError("train.init_use_ema: true needs train.init_checkpoint (the file whose EMA weights to "
                              "start from); without one the U-Net starts from random weights")
        self.net = load(init, config, use_ema=bool(t.get("init_use_ema", False))) if init else build(config)
        self.net.train()  # load() returns it in eval mode, as for sampling: Lightning keeps submodules' modes, so
        # the U-Net would train without dropout or gradient checkpointing (the encoders are set to eval below)
        self.net.config = config
        load_components(self.net, t.get("components") or {})
        check_joint_text_config(config)
        check_latent_caches(config, self.net)
        check_buckets(config, "diffusion", self.net.first_stage_model.downsample_factor)
        self.net.first_stage_model.requires_grad_(False).eval()
        self.net.cond_stage_model.requires_grad_(False).eval()
        self.inversion = inversion_settings(config)  # train.textual_inversion (ldm.diffusion.inversion)
        # the captions are encoded with gradients: the text encoder trains (joint_text), or a new word's vectors do
        self.text_trainable = text_encoder_trainable(config) or self.inversion is not None
        if self.inversion is not None:
            self.net.model.requires_grad_(False)
            add_trainable_word(self.net.cond_stage_model, self.inversion)
            self.trains_in_eval = {"net.cond_stage_model": "its new word's vectors, the rest frozen as at inference "
                                                            "(textual inversion)"}
        elif self.text_trainable:
            unfreeze_text_encoder(self.net.cond_stage_model)
        if t.get("gradient_checkpointing") is not None:  # overrides the U-Net config's use_checkpoint
            self.net.unet.set_gradient_checkpointing(bool(t.gradient_checkpointing))
        lora = t.get("lora") or {}
        if int(lora.get("rank", 0)) > 0:
            from ldm.lora import DEFAULT_TARGETS, add_lora  # noqa: PLC0415

            try:
                add_lora(self.net.model, int(lora.rank), lora.get("alpha"), lora.get("targets") or DEFAULT_TARGETS)
            except ValueError as e:
                raise ConfigError(f"train.lora: {e}") from None
        decay = t.get("ema_decay")
        self.model_ema = EMA(self.net.model, decay=float(decay)) if decay else None
        self.guard = StepGuard(int(t.get("max_consecutive_nonfinite", 10)))
        self._t0: float | None = None
        self.batches_seen = 0  # data position: batches consumed, saved in checkpoints for exact resume

    # -- batches ---------------------------------------------------------------------------------------------
    def _latents(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        vae = self.net.first_stage_model
        if "latent" in batch:  # a latent cache stores raw posterior samples; scale/shift are applied here
            z = batch["latent"].float()
            return (z - vae.shift_factor) * vae.scale_factor
        with torch.no_grad():
            x = batch["image"].to(self.device, next(vae.parameters()).dtype)
            return vae.encode_latents(x, sample=True, generator=gen).float()  # (B, C, h, w)

    def _context(self, batch: dict[str, Any], gen: torch.Generator, dropout: bool = True) -> torch.Tensor:
        """Token states (B, 77, D) of the captions (or the cached ones); with probability ``train.caption_dropout``
        (when ``dropout``) a row is replaced by the empty-prompt embedding, the unconditional branch of
        classifier-free guidance. A text encoder that trains (:mod:`ldm.diffusion.joint_text`) encodes them with
        gradients, "" in the same call."""
        p = float(self.config.train.get("caption_dropout", 0.0)) if dropout else 0.0
        if self.text_trainable and "context" in batch:
            raise ConfigError("the batches hold cached token states (a latent cache made with the text encoder), but "
                              "this run encodes its captions anew (model.params.cond_stage_trainable or "
                              "train.textual_inversion): train from images or cache without them")
        captions = list(batch["caption"]) if "caption" in batch else []
        if self.inversion is not None:
            captions = inversion_captions(captions, self.inversion)
        if self.text_trainable and torch.is_grad_enabled():
            both = self.net.cond_stage_model(captions + ([""] if p > 0 else [])).to(self.device)  # (B [+ 1], 77, D)
            c, empty = both[: len(captions)], both[len(captions):]
        else:
            with torch.no_grad():
                c = batch["context"] if "context" in batch else self.net.cond_stage_model(captions)
            c, empty = c.to(self.device), None
        if p > 0:
            drop = torch.rand(c.shape[0], generator=gen, device=gen.device) < p  # (B,)
            empty = self._empty_context() if empty is None else empty
            c = torch.where(drop.to(c.device)[:, None, None], empty.to(c.dtype), c)
        return c

    def _empty_context(self) -> torch.Tensor:
        """The embedding of "" (1, 77, D), computed once when the text encoder is frozen (it never changes)."""
        if self.text_trainable:
            with torch.no_grad():
                return self.net.cond_stage_model([""]).to(self.device)
        if getattr(self, "_empty", None) is None or self._empty.device != self.device:
            with torch.no_grad():
                self._empty = self.net.cond_stage_model([""]).to(self.device)
        return self._empty

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def _trainable(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """The trained parameters: the U-Net's (or its adapters), and the text encoder's when it trains."""
        unet = [p for p in self.net.model.parameters() if p.requires_grad]
        text = [p for p in self.net.cond_stage_model.parameters() if p.requires_grad] if self.text_trainable else []
        return unet, text

    def configure_optimizers(self) -> Any:
        unet, text = self._trainable()
        t = self.config.train
        if not text or not unet:  # one part trains: the U-Net (or its adapters), or a new word's vectors
            return build_optimizer(self, unet or text, t)
        ratio = float(t.get("text_encoder_lr") or t.lr) / float(t.lr)  # of train.lr, so that lr_scale scales both
        return build_optimizer(self, [{"params": unet}, {"params": text, "lr_ratio": ratio}], t)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        t = self.config.train
        self.batches_seen += 1
        fail = t.get("debug_fail")  # fault injection for the distributed-failure tests: {rank: R, step: S}
        if fail and self.global_rank == int(fail["rank"]) and self.global_step >= int(fail["step"]):
            raise RuntimeError(f"train.debug_fail: injected failure on rank {self.global_rank} at step "
                               f"{self.global_step}")
        opt, sched = self.optimizers(), self.lr_schedulers()
        gen = step_generator(self, int(t.get("seed", 0)))
        z = self._latents(batch, gen)
        c = self._context(batch, gen)
        loss = self._loss(z, c, gen).mean()
        params = [p for part in self._trainable() for p in part]
        check = bool(t.get("check_finite", True))
        if guarded_step(self, opt, loss, params, clip=t.get("grad_clip"), check_grads=check):
            advance(sched)
            every = int(t.get("ema_every_n_steps", 1))
            if self.model_ema is not None and self.global_step % every == 0:
                self.model_ema.update(self.net.model, steps=every)
        self._log_step(loss.detach(), z.shape[0])
        return loss.detach()

    def _loss(self, z: torch.Tensor, c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The per-sample training loss (B,) of latents z (B, C, h, w) under context c (B, 77, D)."""
        from ldm.diffusion.losses import diffusion_loss  # noqa: PLC0415

        t = self.config.train
        return diffusion_loss(self.net.model, z, {"context": c}, self.net.alphas_cumprod, self.net.parameterization,
                              generator=gen, min_snr_gamma=t.get("min_snr_gamma"),
                              offset_noise=float(t.get("offset_noise", 0.0)))

    @torch.no_grad()
    def validation_metrics(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The training loss (B,) without caption dropout, of the weights and, when kept, of the EMA weights on the
        same noise and timesteps (``ldm.training.validation``)."""
        model = self.net.model
        with eval_mode(model):
            z, c = self._latents(batch, gen), self._context(batch, gen, dropout=False)
            state = gen.get_state()
            out = {"loss": self._loss(z, c, gen)}
            if self.model_ema is not None:
                gen.set_state(state)
                with self.model_ema.swapped_into(model):
                    out["loss_ema"] = self._loss(z, c, gen)
        return out

    def _log_step(self, loss: torch.Tensor, batch: int) -> None:
        """The batch's metrics (:func:`ldm.training.step_log.log_step`); ``train/img_per_s`` at the optimizer step:
        its k batches' images over the time since the step before (under accumulation one batch's rate would miss
        the others, or hold the wait for all of them)."""
        now = time.perf_counter()
        values = {"train/loss": loss, "train/lr": self.lr_schedulers().get_last_lr()[0],
                  "train/skipped": self.guard.skipped, "train/amp_skipped": self.guard.amp_skipped}
        k = batches_per_step(self)
        steps = closes_window(self, k)
        if steps and self._t0 is not None:
            values["train/img_per_s"] = k * batch * self.trainer.world_size / max(now - self._t0, 1e-9)
        log_step(self, values, bar=("train/loss", "train/img_per_s"))
        if steps:
            self._t0 = now

    def setup(self, stage: str) -> None:
        """Before the strategy moves and wraps the module (DDP buckets see the final layout):
        ``train.channels_last``."""
        from ldm.training.layout import to_channels_last, wants_channels_last  # noqa: PLC0415

        if is_sharding(self):  # FSDP2 shards contiguous weights only (null means off; true is refused)
            return
        if stage == "fit" and wants_channels_last(self.config.train, self.trainer.strategy.root_device):
            to_channels_last(self.net.unet, self.model_ema)
            log.info("train.channels_last: U-Net weights%s in channels_last", " and EMA" if self.model_ema else "")

    def configure_model(self) -> None:
        """``trainer.strategy: fsdp`` (:mod:`ldm.training.sharding`): shard the U-Net over the ranks and keep the EMA
        as sharded copies beside it. Nothing for the other strategies."""
        from ldm.training.sharding import shard_unet  # noqa: PLC0415

        if not is_sharding(self) or getattr(self, "_sharded", False):
            return
        shard_unet(self, self.trainer.strategy.device_mesh["data_parallel"])
        if self.model_ema is not None:  # the same values, as DTensor shards
            self.model_ema = EMA(self.net.model, decay=float(self.model_ema.decay))
        self._sharded = True

    def on_train_start(self) -> None:
        from ldm.training.layout import match_optimizer_state  # noqa: PLC0415

        for opt in self.trainer.optimizers:  # after a resume the moments may be in the other layout
            match_optimizer_state(opt)

    def on_fit_start(self) -> None:
        from ldm.diffusion.latent_stats import maybe_measure_scale  # noqa: PLC0415

        maybe_measure_scale(self)
        compile_unet(self.net.unet, self.config.train, shapes=len(data_buckets(self.config)) + 2)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["latent_scale"] = [float(self.net.first_stage_model.scale_factor),
                                      float(self.net.first_stage_model.shift_factor)]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        scale, shift = checkpoint["latent_scale"]
        self.set_latent_scale(scale, shift)
        self._scale_measured = True

    def set_latent_scale(self, scale: float, shift: float = 0.0) -> None:
        vae = self.net.first_stage_model
        vae.scale_factor.fill_(scale)
        vae.shift_factor.fill_(shift)
        self.config.model.params.scale_factor = float(scale)
        self.config.model.params.shift_factor = float(shift)

    def export(self, path: str, ema: bool = True) -> str:
        """Write the trained model as safetensors with its config: EMA weights in ``model_ema.*``; with LoRA, the
        base model unchanged in ``path`` and the adapters (EMA-averaged when kept) in ``lora.safetensors`` beside it,
        and again in kohya-ss's layout in ``lora-kohya.safetensors`` (for the web UIs, ComfyUI, diffusers)."""
        from pathlib import Path  # noqa: PLC0415

        from ldm.checkpoint import META_CONFIG, save_safetensors  # noqa: PLC0415
        from ldm.loading import save  # noqa: PLC0415
        from ldm.lora import lora_state_dict, strip_lora  # noqa: PLC0415
        from ldm.lora_formats import KOHYA_METADATA, to_kohya  # noqa: PLC0415

        if is_sharding(self):  # trainer.strategy=fsdp: every rank gathers the shards, rank 0 writes
            writer = self.trainer.is_global_zero
            whole = _Weights(self.net, full_state_dict(self.net, keep=writer))
            ema_state = {f"model_ema.{k}": v for k, v in full_state_dict(self.model_ema, keep=writer).items()} if (
                ema and self.model_ema is not None) else None
            return str(save(whole, path, ema_state=ema_state)) if writer else path
        if self.inversion is not None:  # the new word's vectors beside the unchanged base model
            write_embedding(self.net.cond_stage_model.extra_vectors, self.inversion["name"], path)
            return str(save(_Weights(self.net, strip_inversion(self.net.state_dict())), path))
        use_ema = ema and self.model_ema is not None
        adapters = lora_state_dict(self.net.model)
        if not adapters:
            return str(save(self.net, path, ema_state=self.model_ema.ldm_state() if use_ema else None))
        with (self.model_ema.swapped_into(self.net.model) if use_ema else nullcontext()):
            adapters = {f"model.{k}": v for k, v in lora_state_dict(self.net.model).items()}
        meta = {META_CONFIG: json.dumps(OmegaConf.to_container(self.config, resolve=True))}
        save_safetensors(adapters, Path(path).with_name("lora.safetensors"), meta)
        kohya = to_kohya(adapters, self.config.model.params.unet_config.params)  # for the web UIs and diffusers
        save_safetensors(kohya, Path(path).with_name("lora-kohya.safetensors"), KOHYA_METADATA)
        return str(save(_Weights(self.net, strip_lora(self.net.state_dict())), path))


def data_buckets(config: DictConfig) -> tuple[tuple[int, int], ...]:
    """The aspect-ratio buckets the training data comes in (none unless ``data.resize: bucket``)."""
    from ldm.data.transforms import aspect_buckets  # noqa: PLC0415
    from ldm.training.datamodule import bucket_args  # noqa: PLC0415

    d = config.get("data") or {}
    if d.get("resize") != "bucket":
        return ()
    args = bucket_args(d)
    return aspect_buckets(int(d.size), args["bucket_step"], args["bucket_max_ratio"])


def replays_graphs(t: Mapping[str, Any]) -> bool:
    """Whether the compiled U-Net replays CUDA graphs: ``train.compile`` with ``train.compile_mode`` reduce-overhead or
    max-autotune (inductor's CUDA graph trees; each U-Net call then starts a new generation of their memory pool)."""
    return bool(t.get("compile", False)) and t.get("compile_mode") in GRAPH_MODES


def marking_steps(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` (a compiled U-Net's, replaying CUDA graphs) with each call marked as a new step of the graphs'
    memory pool (``torch.compiler.cudagraph_mark_step_begin``): one call per loss, validation loss or sampling step,
    so the last call's graph outputs are dead by the next."""
    @functools.wraps(forward)
    def marked(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return forward(*args, **kwargs)

    return marked


def compile_unet(unet: torch.nn.Module, t: DictConfig, shapes: int = 0) -> None:
    """``train.compile``: true (inductor) or a torch.compile backend name; ``train.compile_mode``: its mode.

    The U-Net's forward is compiled in place (the module, its parameter names and checkpoints stay as they are), for
    static shapes: a new batch or latent size (the sampling callback, a resolution change) compiles once more and the
    run goes on; ``torch._dynamo.config.cache_size_limit`` bounds how many shapes are kept, raised to ``shapes``
    (aspect-ratio buckets: one graph each, compiled the first time a bucket comes up).
    """
    choice = t.get("compile", False)
    if not choice:
        return
    backend = "inductor" if choice is True else str(choice)
    if "forward" in vars(unet):  # already compiled (a second fit on the same module)
        return
    if backend == "inductor":
        guard_conv_templates(t.get("compile_mode"), None)  # torch builds whose autotuner can pick wrong convolutions
    import torch._dynamo.config as dynamo_config  # noqa: PLC0415

    if shapes > dynamo_config.cache_size_limit:
        log.info("train.compile: torch._dynamo cache_size_limit %d -> %d (one graph per bucket)",
                 dynamo_config.cache_size_limit, shapes)
        dynamo_config.cache_size_limit = shapes
    unet.forward = torch.compile(unet.forward, backend=backend, mode=t.get("compile_mode"), dynamic=False)
    if replays_graphs(t):
        unet.forward = marking_steps(unet.forward)
    log.info("train.compile: U-Net forward compiled (backend %s, mode %s); the first step of each shape compiles",
             backend, t.get("compile_mode"))


def check_latent_caches(config: DictConfig, net: torch.nn.Module) -> None:
    """``data.train`` and ``data.val`` that are latent caches were encoded by ``net``'s autoencoder (and text
    encoder, when they hold token states): :func:`ldm.data.latent_cache.check_cache_encoders`."""
    from ldm.data.latent_cache import check_cache_encoders  # noqa: PLC0415
    from ldm.data.shards import has_manifest, read_manifest  # noqa: PLC0415

    d = config.get("data") or {}
    for key in ("train", "val"):
        spec = d.get(key)
        if isinstance(spec, str) and has_manifest(spec) and read_manifest(spec).get("kind") == "latents":
            check_cache_encoders(spec, net, f"data.{key}")


def load_components(net: torch.nn.Module, components: Any) -> None:
    """Load separately trained parts (``train.components: {first_stage_model: AE.safetensors, cond_stage_model:
    CLIP.safetensors}``, the exports of the autoencoder and CLIP stages) strictly into ``net``.

    A CLIP export also holds its image tower (``model.visual.*``), which the text encoder does not need.
    """
    from ldm.checkpoint import read_state_dict  # noqa: PLC0415

    for name, path in dict(components).items():
        if name not in ("first_stage_model", "cond_stage_model"):
            raise ValueError(f"train.components: unknown part {name!r} (first_stage_model or cond_stage_model)")
        target = getattr(net, name)
        sd, _ = read_state_dict(path)
        own = set(target.state_dict())
        extra = [k for k in sd if k not in own]
        if any(not k.startswith("model.visual.") for k in extra):
            raise ValueError(f"train.components.{name}: {path} has keys this model lacks, e.g. "
                             f"{[k for k in extra if not k.startswith('model.visual.')][:3]} (architecture differs?)")
        result = target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        if result.missing_keys:
            raise ValueError(f"train.components.{name}: {path} lacks {len(result.missing_keys)} key(s), "
                             f"e.g. {result.missing_keys[:3]} (architecture differs?)")
        log.info("loaded %s from %s (%d tensors, %d image-tower tensors ignored)", name, path, len(own), len(extra))


class _Weights:
    """A model's config with given weights, for ``save``: the base model without its LoRA or textual-inversion keys,
    or a sharded model's gathered weights (:func:`ldm.training.sharding.full_state_dict`)."""

    def __init__(self, net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.config, self.state = net.config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state
