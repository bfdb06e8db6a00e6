"""Reduction of prior features to a low dimension with a reconstruction objective (paper Sec. 3.2).

"We reduce all latent spaces and priors to a low dimension (e.g. 32) with reconstruction
objective": each token (a feature vector of dimension D at one grid cell) is mapped to
`reduced_dim` numbers by a reducer fitted to reconstruct it:

- `PCAReducer`: the optimal linear map under MSE (top eigenvectors of the token covariance, float64).
- `BottleneckReducer`: a per-token MLP autoencoder D -> r -> D trained with MSE. It starts as
  the PCA solution (linear paths initialised from PCA, nonlinear residual branches zero-initialised),
  so training can only move it from the best linear reducer towards a better nonlinear one.

Reducers are fitted on at most `FIT_TOKENS` tokens drawn uniformly (seeded) from all features, then
applied to every token; the reported errors are measured on all tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dmvae_study.config import ExperimentConfig, PriorConfig

FIT_TOKENS = 2**18           # tokens a reducer is fitted on (PCA covariance, bottleneck training set)
BOTTLENECK_BATCH = 2048      # tokens per bottleneck training step
BOTTLENECK_LR = 1e-3
APPLY_CHUNK = 1 << 16        # tokens per encode / decode call


class Reducer(Protocol):
    name: str

    def fit(self, tokens: torch.Tensor) -> "Reducer": ...      # (M, D)
    def encode(self, tokens: torch.Tensor) -> torch.Tensor: ...  # (M, D) -> (M, r)
    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...   # (M, r) -> (M, D)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """`(N, D, h, w)` -> `(N*h*w, D)`."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_tokens(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """`(N*h*w, r)` -> `(N, r, h, w)`."""
    return t.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _pca_basis(tokens: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean `(D,)`, top-r principal directions `(D, r)` and all eigenvalues (descending), float64."""
    x = tokens.double()
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    v = evecs[:, :r]
    v = v * torch.sign(v[v.abs().argmax(0), torch.arange(r, device=v.device)])  # deterministic signs
    return mu, v, evals


class PCAReducer:
    """Linear reducer: `codes = (x - mean) @ V`, `x_hat = codes @ V^T + mean`, V the top-r PCs."""

    name = "pca"

    def __init__(self, reduced_dim: int):
        self.r = reduced_dim

    def fit(self, tokens: torch.Tensor) -> "PCAReducer":
        mu, v, evals = _pca_basis(tokens, self.r)
        self.mean, self.components = mu.float().to(tokens.device), v.float().to(tokens.device)
        self.explained_fit = float(evals[: self.r].sum() / evals.sum().clamp_min(1e-30))
        return self

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - self.mean) @ self.components

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.components.T + self.mean


class _Branch(nn.Module):
    """`x @ W + mlp(x)`: a linear path (PCA-initialised) plus a zero-initialised SiLU MLP residual."""

    def __init__(self, w: torch.Tensor, hidden: int):
        super().__init__()
        d_in, d_out = w.shape
        self.lin = nn.Linear(d_in, d_out, bias=True)
        self.lin.weight.data.copy_(w.T)
        self.lin.bias.data.zero_()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.mlp(x)


class BottleneckReducer(nn.Module):
    """Per-token MLP autoencoder `D -> reduced_dim -> D` trained with MSE (Sec. 3.2).

    Inputs are centred and divided by one scalar (their overall std), which keeps the objective
    the plain MSE of the raw features. Hidden width `min(max(2D, 8r, 64), 512)`."""

    name = "feature_ae"

    def __init__(self, reduced_dim: int, steps: int, seed: int = 0, progress: bool = False):
        super().__init__()
        self.r, self.steps, self.seed, self.progress = reduced_dim, steps, seed, progress

    def fit(self, tokens: torch.Tensor) -> "BottleneckReducer":
        d, dev = tokens.shape[1], tokens.device
        mu, v, _ = _pca_basis(tokens, self.r)
        self.register_buffer("mu", mu.float().to(dev))
        xs = tokens - self.mu
        self.register_buffer("sigma", xs.pow(2).mean().sqrt().clamp_min(1e-8))
        xs = xs / self.sigma
        hidden = min(max(2 * d, 8 * self.r, 64), 512)
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG state untouched
            torch.default_generator.manual_seed(self.seed)
            self.enc, self.dec = _Branch(v.float(), hidden).to(dev), _Branch(v.T.float(), hidden).to(dev)
        opt = torch.optim.AdamW(list(self.enc.parameters()) + list(self.dec.parameters()), lr=BOTTLENECK_LR,
                                weight_decay=0.0)
        bs = min(BOTTLENECK_BATCH, xs.shape[0])
        with torch.enable_grad():
            for step in tqdm(range(self.steps), desc="bottleneck reducer", disable=not self.progress):
                for group in opt.param_groups:  # cosine decay to 0
                    group["lr"] = BOTTLENECK_LR * 0.5 * (1 + math.cos(math.pi * step / max(self.steps, 1)))
                x = xs[torch.randint(0, xs.shape[0], (bs,), generator=g).to(dev)]
                loss = F.mse_loss(self.dec(self.enc(x)), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
                opt.step()
        self.requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.enc((tokens - self.mu) / self.sigma)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.dec(codes) * self.sigma + self.mu


def make_reducer(kind: str, reduced_dim: int, steps: int, seed: int = 0, progress: bool = False) -> Reducer:
    """`kind` is a `prior.reduction` on features: feature_ae (the bottleneck autoencoder) or pca."""
    if kind == "pca":
        return PCAReducer(reduced_dim)
    if kind == "feature_ae":
        return BottleneckReducer(reduced_dim, steps, seed, progress)
    raise ValueError(f"reduction {kind!r} does not reduce features; choose feature_ae, pca or none")


def _none_report(d: int, note: str) -> dict:
    return {"reducer": "none", "reducer_note": note, "reducer_in_dim": d, "reducer_dim": d,
            "recon_mse": 0.0, "reducer_rel_error": 0.0, "explained": 1.0}


@torch.no_grad()
def reduce_chunks(chunks: Callable[[], Iterable[torch.Tensor]], cfg: PriorConfig | ExperimentConfig, *,
                  counts: list[int] | None = None, seed: int = 0, device: torch.device | str = "cpu",
                  progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Reduce features given as re-iterable chunks `(n_i, D, h, w)` to codes `(N, r, h, w)`.

    Two passes over the chunks (they may be shards on disk): sample the fit tokens and accumulate
    exact per-channel moments, then encode every token and measure the reconstruction error.
    `counts` (items per chunk) saves a third read when known.
    Report: reducer, in/out dims, `recon_mse` (mean squared error per feature value, raw units),
    `reducer_rel_error` (= SSE / total sum of squares about the channel means = 1 - explained)."""
    pcfg = cfg.prior if isinstance(cfg, ExperimentConfig) else cfg
    r, kind = pcfg.reduced_dim, pcfg.reduction or "feature_ae"
    if kind == "none":
        x = torch.cat(list(chunks())).float()
        return x, _none_report(x.shape[1], "prior.reduction=none")
    first = next(iter(chunks()))
    d, h, w = first.shape[1:]
    if d <= r:
        return torch.cat([c.float() for c in chunks()]), _none_report(d, f"in_dim {d} <= reduced_dim {r}: kept")
    # pass 1: uniform fit sample (seeded) and exact moments for the relative error
    counts = counts if counts is not None else [int(c.shape[0]) for c in chunks()]
    g = torch.Generator().manual_seed(seed)
    total = sum(counts) * h * w
    fit, s1, s2 = [], torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for c in chunks():
        t = to_tokens(c.float())
        s1 += t.double().sum(0)
        s2 += t.double().pow(2).sum(0)
        k = min(t.shape[0], round(FIT_TOKENS * t.shape[0] / total))
        fit.append(t[torch.randperm(t.shape[0], generator=g)[:k]])
    sst = float((s2 - s1.pow(2) / total).sum())
    fit_tokens = torch.cat(fit).to(device)
    del fit
    reducer = make_reducer(kind, r, pcfg.reducer_steps, seed, progress).fit(fit_tokens)
    # pass 2: encode everything, measure the reconstruction error on all tokens
    codes, sse = [], 0.0
    for c in chunks():
        t = to_tokens(c.float())
        out = []
        for j in range(0, t.shape[0], APPLY_CHUNK):
            tj = t[j:j + APPLY_CHUNK].to(device)
            z = reducer.encode(tj)
            sse += float((reducer.decode(z) - tj).double().pow(2).sum())
            out.append(z.float().cpu())
        codes.append(from_tokens(torch.cat(out), c.shape[0], h, w))
    rel = sse / max(sst, 1e-30)
    report = {"reducer": reducer.name, "reducer_in_dim": int(d), "reducer_dim": int(r),
              "reducer_fit_tokens": int(fit_tokens.shape[0]),
              "reducer_steps": int(pcfg.reducer_steps) if kind == "feature_ae" else 0,
              "recon_mse": sse / (total * d), "reducer_rel_error": rel, "explained": 1.0 - rel}
    return torch.cat(codes), report


def reduce(features: torch.Tensor, cfg: PriorConfig | ExperimentConfig, *, seed: int = 0,
           device: torch.device | str = "cpu", progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Reduce in-memory features `(N, D, h, w)` to codes `(N, reduced_dim, h, w)` (Sec. 3.2); see
    `reduce_chunks` for the report. `prior.reduction == "none"` or `D <= reduced_dim` keeps them."""
    return reduce_chunks(lambda: [features], cfg, counts=[features.shape[0]], seed=seed, device=device,
                         progress=progress)
