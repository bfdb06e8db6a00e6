"""Where a finished study's CPU time went, stage by stage, and how far each stage is from the machine's peak.

Reads a study folder's row manifests (`rows/<row>.json`, e.g. `docs/mini-stop40`), takes every distinct
artifact the study's rows use once (a seed's shared tokenizer, a teacher two rows share), and prices each
with the wall time the row that trained it measured (`summaries.<stage>.wall_s`; a reference set's own
`build_s` when the row read it finished). Artifacts no manifest
timed (shared work the driver ran before the trials, or a stage reused from an earlier study) are read
from `--store` (the last `time/wall_s` of the artifact's `metrics.jsonl`) when given, else priced at the
median FLOP rate of the measured artifacts of the same stage (none measured: the `--dry-run` model's assumed
CPU rate, `dmvae_study.cost.CPU_CORE_FLOPS`).

Next to each stage's time it puts the model FLOPs of the same work (`dmvae_study.cost.stage_cost`:
matmuls, convolutions and attention counted on the meta device; a training step is 3x its forward),
the rate that makes, and the FLOP floor: the time the stage would take at the measured one-thread
fp32 matmul peak of this machine (`--peak`, GFLOP/s per core; measured when not given). The floor is a
bound, not a plan: depthwise convolutions and the tiny DiT's elementwise passes cannot run at matmul
peak on a CPU.

Times are core time: a stage's wall time x its threads, read from the host line the stage records
(`trainers.common.host_facts`); artifacts older than that record count `--assume-threads` (1: the `mini`
study's trials ran two at a time, one core each; the driver's shared work before them may have used two).

    python -m benchmarks.study_budget docs/mini-stop40 --store /work/store --cores 2
    python -m benchmarks.study_budget docs/mini-stop40 --scale generator=0.4,teacher=0.5   # what-if on steps
    python -m benchmarks.study_budget docs/mini-stop40 --speedup 'dmd=1.3,tokenizer (conv encoder)=1.7'  # on rates

`--scale` changes the work (a stage's time and FLOPs scale with its steps); `--speedup` changes the rate (time
divided, FLOPs kept), e.g. the per-stage factors `benchmarks.bench_bf16_cpu` measures. Keys are a stage
(`tokenizer`) or a group as the table prints it (`tokenizer (conv encoder)`); a group's own key wins.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dmvae_study.cost import CPU_CORE_FLOPS
from dmvae_study.store import ArtifactDir, read_jsonl


# A reference set's work depends on its prior (sampling a Gaussian, a text encoder, encoding images) more than
# the FLOP model says: keep its own measured time under median pricing.
OWN_TIME = ("reference",)
MIN_TRAINED_S = 2.0  # a manifest's stage time below this is the row reading a finished artifact, not training it


@dataclass
class Artifact:
    """One distinct piece of a study's work: a stage's artifact, the rows that use it, what it cost."""

    stage: str
    group: str                       # stage, split where rows train different networks in it
    name: str                        # the artifact id, e.g. teacher-ec706cbd571b
    rows: list[str] = field(default_factory=list)
    measured_s: float | None = None  # core time the row (or the store's log) measured: wall x threads; None if none did
    source: str = "priced"           # where measured_s comes from: "manifest" or "store"
    threads: int | None = None       # the stage's thread count, from its recorded host (None: not recorded)
    flops: float = 0.0
    cost_s: float = 0.0              # what the budget counts: measured_s, or priced at its stage's median rate


def stage_group(stage: str, cfg: Any) -> str:
    """Stages whose networks differ between baseline and DMVAE rows are priced apart."""
    from dmvae_study.pipeline import is_baseline
    if stage in ("tokenizer", "latents", "eval"):
        return f"{stage} ({'conv encoder' if is_baseline(cfg) else 'Lite0 encoder'})"
    return stage


def host_threads(host: str | None) -> int | None:
    """The thread count in a stage's recorded host (`trainers.common.host_facts`: '... · 2 thread(s)')."""
    m = re.search(r"(\d+) thread\(s\)", host or "")
    return int(m.group(1)) if m else None


def collect(folder: Path, store: Path | None = None, price: str = "own",
            rows: Sequence[str] = (), assume_threads: int = 1) -> list[Artifact]:
    """The study's distinct artifacts with their measured (or store-read) wall time and counted FLOPs.
    `price="median"` prices every artifact at the median FLOP rate of its stage group instead of its own
    time: a typical trial, with the ones that ran under extra load (or built a seed's shared work) evened out.
    `rows`: glob patterns of the row names to take (default: every row), e.g. a study's own rows without the
    controls another study merged into its folder. Core time is wall time x the stage's threads, read from its
    recorded host; where none was recorded (artifacts older than that record) `assume_threads`."""
    from dmvae_study.config import ExperimentConfig
    from dmvae_study.cost import stage_cost
    from dmvae_study.pipeline import resolve
    rows_dir = folder / "rows" if (folder / "rows").is_dir() else folder
    manifests = [m for m in sorted(rows_dir.glob("*.json"))
                 if not rows or any(fnmatch.fnmatchcase(m.stem, pat) for pat in rows)]
    if not manifests:
        raise SystemExit(f"no row manifests (rows/*.json) under {folder}"
                         + (f" matching --rows {','.join(rows)}" if rows else "")
                         + ": pass a study folder such as docs/mini-stop40")
    arts: dict[str, Artifact] = {}
    for path in manifests:
        man = json.loads(path.read_text())
        if man.get("record", {}).get("status", "ok") != "ok":
            continue
        cfg = resolve(ExperimentConfig.from_dict(man["config"]))
        for stage, ref in man.get("artifacts", {}).items():
            name = Path(ref).name
            a = arts.get(name)
            if a is None:
                a = arts[name] = Artifact(stage, stage_group(stage, cfg), name, flops=stage_cost(cfg, stage)["flops"])
            a.rows.append(man["row"])
            summary = man.get("summaries", {}).get(stage) or {}
            wall = summary.get("wall_s") or 0.0
            threads = host_threads(summary.get("host"))
            cores = threads or assume_threads
            if wall >= MIN_TRAINED_S and (a.measured_s is None or wall * cores > a.measured_s):
                a.measured_s, a.source, a.threads = float(wall) * cores, "manifest", threads
            elif a.measured_s is None and summary.get("build_s") is not None:  # a reference set keeps its build time
                a.measured_s, a.source, a.threads = float(summary["build_s"]) * cores, "manifest", threads
    for a in arts.values():
        if a.measured_s is None and store is not None:
            art = ArtifactDir(store / a.stage / a.name)
            metrics = art.file("metrics.jsonl")
            timed = [r["time/wall_s"] for r in read_jsonl(metrics) if "time/wall_s" in r] if metrics.exists() else []
            if timed:
                a.threads = host_threads(art.summary().get("host"))
                a.measured_s, a.source = float(timed[-1]) * (a.threads or assume_threads), "store"
    by_group: dict[str, list[Artifact]] = {}
    for a in arts.values():
        by_group.setdefault(a.group, []).append(a)
    for group in by_group.values():  # unmeasured: the median FLOP rate of the measured ones of the stage
        rates = [a.flops / a.measured_s for a in group if a.measured_s and a.flops]
        for a in group:
            if a.measured_s is None or (price == "median" and rates and a.stage not in OWN_TIME):
                a.cost_s = a.flops / (statistics.median(rates) if rates else CPU_CORE_FLOPS)
            else:
                a.cost_s = a.measured_s
    return sorted(arts.values(), key=lambda a: (a.group, a.name))


def parse_scale(s: str | None, flag: str = "--scale") -> dict[str, float]:
    """`generator=0.4,teacher=0.5` -> {stage or group: factor} (`--scale`: a what-if on steps, time and FLOPs
    scale with them; `--speedup`: on rates, time divided by the factor)."""
    out: dict[str, float] = {}
    for part in filter(None, (s or "").split(",")):
        key, _, val = part.partition("=")
        try:
            f = float(val)
        except ValueError:
            raise SystemExit(f"{flag} wants STAGE=FACTOR[,...], e.g. generator=0.5; got {part!r}") from None
        if not f > 0:
            raise SystemExit(f"{flag} {part!r}: the factor must be > 0")
        out[key.strip()] = f
    return out


def _check_keys(keys: dict[str, float], arts: Sequence[Artifact], flag: str) -> None:
    known = {a.group for a in arts} | {a.stage for a in arts}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise SystemExit(f"{flag}: no stage or group {', '.join(map(repr, unknown))} in this study; "
                         f"choose from {', '.join(sorted(known))}")


def budget(arts: Sequence[Artifact], *, cores: int, peak_gflops: float, scale: dict[str, float] | None = None,
           speedup: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-group table rows and the study totals (core-minutes, wall on `cores` if perfectly packed)."""
    scale, speedup = scale or {}, speedup or {}
    _check_keys(scale, arts, "--scale")
    _check_keys(speedup, arts, "--speedup")
    groups: dict[str, list[Artifact]] = {}
    for a in arts:
        groups.setdefault(a.group, []).append(a)
    table = []
    for g, items in sorted(groups.items(), key=lambda kv: -sum(a.cost_s for a in kv[1])):
        f = scale.get(g, scale.get(items[0].stage, 1.0))
        sp = speedup.get(g, speedup.get(items[0].stage, 1.0))
        core_min = sum(a.cost_s for a in items) / 60 * f / sp
        flops = sum(a.flops for a in items) * f
        timed = [a.measured_s / 60 for a in items if a.measured_s is not None]
        table.append({"group": g, "artifacts": len(items), "timed": len(timed),
                      "threads_known": sum(a.threads is not None for a in items if a.measured_s is not None),
                      "median_min": statistics.median(timed) if timed else None, "core_min": core_min,
                      "gflop": flops / 1e9, "gflops": flops / 1e9 / (core_min * 60) if core_min else None,
                      "pct_peak": 100 * flops / 1e9 / (core_min * 60) / peak_gflops if core_min else None,
                      "floor_min": flops / 1e9 / peak_gflops / 60, "scale": f, "speedup": sp})
    total = sum(r["core_min"] for r in table)
    floor = sum(r["floor_min"] for r in table)
    return table, {"core_min": total, "wall_h": total / cores / 60, "floor_wall_h": floor / cores / 60,
                   "cores": cores, "peak_gflops": peak_gflops}


def format_report(table: list[dict[str, Any]], totals: dict[str, Any]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)
    lines = ["| stage | artifacts (timed, threads recorded) | core-min each (median, timed) | core-min | model GFLOP "
             "| GFLOP/s per core | % of peak | floor core-min |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        name = r["group"] + (f" x{r['scale']:g}" if r["scale"] != 1 else "") + \
            (f" /{r['speedup']:g}" if r.get("speedup", 1) != 1 else "")
        lines.append(f"| {name} | {r['artifacts']} ({r['timed']}, {r['threads_known']}) | {f(r['median_min'], '.1f')} | {r['core_min']:.0f} "
                     f"| {r['gflop']:,.0f} | {f(r['gflops'], '.1f')} | {f(r['pct_peak'], '.0f')} "
                     f"| {r['floor_min']:.1f} |")
    lines.append(f"| **all** | {sum(r['artifacts'] for r in table)} | | **{totals['core_min']:.0f}** | "
                 f"{sum(r['gflop'] for r in table):,.0f} | | | {sum(r['floor_min'] for r in table):.0f} |")
    lines.append("")
    lines.append(f"On {totals['cores']} cores, perfectly packed: **{totals['wall_h']:.2f} h** at the measured stage "
                 f"times; {totals['floor_wall_h']:.2f} h if every counted FLOP ran at the "
                 f"{totals['peak_gflops']:.0f} GFLOP/s one-core matmul peak.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path, help="a study folder with rows/*.json, e.g. docs/mini-stop40")
    ap.add_argument("--store", type=Path, default=None, help="artifact store to read unmeasured stages' times from")
    ap.add_argument("--rows", default="", help="comma list of row-name globs to take, e.g. 'vae-*,gaussian-*' "
                                               "(default: all); a row's shared artifacts are counted once")
    ap.add_argument("--assume-threads", type=int, default=1,
                    help="threads of a stage whose host line was not recorded (default 1)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--peak", type=float, default=None,
                    help="GFLOP/s of one core (default: measured, 1-thread fp32 2048^3 matmul)")
    ap.add_argument("--scale", default=None, help="what-if step factors, e.g. generator=0.4,teacher=0.5")
    ap.add_argument("--speedup", default=None,
                    help="what-if rate factors (time / factor, FLOPs kept), e.g. 'dmd=1.3,tokenizer (conv encoder)=1.7'")
    ap.add_argument("--price", choices=("own", "median"), default="own",
                    help="own: each artifact at the time it measured; median: at its stage's median FLOP rate")
    ap.add_argument("--list", action="store_true", help="also list every artifact with its time and source")
    args = ap.parse_args(argv)
    if args.cores < 1:
        raise SystemExit(f"--cores must be >= 1, got {args.cores}")
    peak = args.peak
    if peak is None:
        import torch
        from benchmarks.common import matmul_peak
        torch.set_num_threads(1)
        peak = max(matmul_peak(torch.device("cpu")) for _ in range(3)) * 1e3
    arts = collect(args.study, args.store, args.price, [r for r in args.rows.split(',') if r], args.assume_threads)
    table, totals = budget(arts, cores=args.cores, peak_gflops=peak, scale=parse_scale(args.scale),
                           speedup=parse_scale(args.speedup, "--speedup"))
    if args.list:
        for a in arts:
            print(f"{a.group:28s} {a.name:28s} {a.source:8s} {a.threads or '?'} thr {a.cost_s / 60:6.1f} core-min  "
                  f"{','.join(a.rows)}")
    print(format_report(table, totals))
    return {"table": table, "totals": totals}


if __name__ == "__main__":
    main()
