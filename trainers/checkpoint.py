"""Checkpoint and resume of a stage: module / optimiser / EMA states and every rank's RNG stream,
written atomically by the main rank; a resumed run continues exactly where an uninterrupted one would."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from dmvae_study.store import ArtifactDir, read_jsonl
from trainers.ema import EMA, unwrap

if TYPE_CHECKING:
    from trainers.common import StageContext

log = logging.getLogger("dmvae_study")


def rng_states(ctx: StageContext) -> list[torch.Tensor]:
    """Every rank's global RNG state (CPU, and CUDA where used), gathered: the beta-VAE posterior noise
    and the stages' unseeded augmentations draw from it, and each rank's stream differs."""
    mine = torch.get_rng_state()
    if ctx.device.type == "cuda":
        mine = torch.cat([mine, torch.cuda.get_rng_state(ctx.device)])
    if ctx.world == 1:
        return [mine]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, mine)
    return out


def _set_rng(ctx: StageContext, state: torch.Tensor) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n])
    if ctx.device.type == "cuda" and state.numel() > n:
        torch.cuda.set_rng_state(state[n:], ctx.device)


def checkpoint_state(modules: dict[str, Any], rng: list[torch.Tensor] | None = None) -> dict[str, Any]:
    state = {}
    for k, m in modules.items():
        if isinstance(m, EMA):
            state[k] = m.shadow.state_dict()
            state[f"{k}.updates"] = m.updates
        elif hasattr(m, "state_dict"):
            state[k] = unwrap(m).state_dict() if isinstance(m, nn.Module) else m.state_dict()
    state["rng_cpu"] = torch.get_rng_state()
    if rng is not None:
        state["rng_ranks"] = rng
    return state


def restore_state(modules: dict[str, Any], state: dict[str, Any], ctx: StageContext | None = None) -> None:
    for k, m in modules.items():
        if k not in state:
            raise KeyError(f"checkpoint lacks {k!r}")
        if isinstance(m, EMA):
            m.shadow.load_state_dict(state[k])
            m.updates = int(state.get(f"{k}.updates", 0))
        elif isinstance(m, nn.Module):
            unwrap(m).load_state_dict(state[k])
        else:
            m.load_state_dict(state[k])
    ranks = state.get("rng_ranks")
    if ctx is not None and ranks is not None and len(ranks) == ctx.world:
        _set_rng(ctx, ranks[ctx.rank])  # this rank's own stream, as an uninterrupted run would have it
    elif "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])


def resume(ctx: StageContext, art: ArtifactDir, modules: dict[str, Any]) -> int:
    """Load the newest good checkpoint into `modules`; return the step to start from (0 if none)."""
    found = art.load_latest_checkpoint()
    if found is None:
        return 0
    step, state = found
    restore_state(modules, state, ctx)
    ctx.resumed_from = step
    if ctx.is_main:
        log.info("[%s] resumed from step %d (%s)", ctx.stage, step, art.path)
    return step


def save(ctx: StageContext, art: ArtifactDir, step: int, modules: dict[str, Any]) -> None:
    rng = rng_states(ctx)  # every rank takes part in the gather
    if ctx.is_main:
        art.save_checkpoint(step, checkpoint_state(modules, rng))
    ctx.barrier()


def last_flushed(art: ArtifactDir) -> dict[str, Any]:
    """The last complete record of the stage's `metrics.jsonl` (a torn last line skipped), `{}` without one: what a
    loop returns when it resumes at its final checkpoint and runs no step (the stage failed while finishing)."""
    path = art.file("metrics.jsonl")
    recs = read_jsonl(path) if path.exists() else []
    return recs[-1] if recs else {}
