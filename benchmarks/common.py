"""What every benchmark shares: device and precision choice, timing, the matmul peak probe, FLOP
counting, peak memory, and the one-row-per-config table (plus `--json OUT`).

Timing: `warmup` untimed calls, then `repeats` timed calls; the reported figure is the median.
On CUDA each call is bracketed by CUDA events (read after one synchronize at the end); on CPU by
`time.perf_counter` (the device is synchronised before each clock read, a no-op on CPU).

FLOPs are *model* FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convs,
attention; elementwise ops are not counted, as in every MFU figure): a training step is forward +
backward of the step as executed, with activation-checkpoint recompute excluded where the caller
counts on an un-checkpointed copy. PyTorch's counter has no formula for the CPU flash-attention
kernel (`_scaled_dot_product_flash_attention_for_cpu`), so it would count 0 attention FLOPs on CPU;
`count_flops` adds the standard SDPA formulas for it.

"% of peak" divides achieved TFLOP/s by the *measured* matmul peak of this process (`matmul_peak`:
bf16 on CUDA, fp32 on CPU), not the datasheet number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

Precision = str  # "auto" | "fp32" | "bf16"


# ---- device and precision -----------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when available, else CPU. TF32 is allowed on CUDA (as `StageContext.create`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev


def amp_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """bf16 autocast on CUDA under `auto` (the trainers' `run.precision=auto`), else as asked."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision in ("auto", "fp32"):
        return None
    raise ValueError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    dt = amp_dtype(device, precision)
    return torch.autocast(device.type, dtype=dt) if dt is not None else contextlib.nullcontext()


def precision_label(device: torch.device, precision: Precision) -> str:
    """"bf16" or "fp32" as this benchmark computes (`auto` resolved on `device`); also the `run.precision` a stage
    needs to compute the same, since the trainers resolve `auto` from `run.use_gpu`, not from the device."""
    return "bf16" if amp_dtype(device, precision) is not None else "fp32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing -------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` timed calls of `fn()` after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"need at least one timed repeat, got {repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak(device: torch.device, n: int | None = None, repeats: int = 10) -> float | None:
    """Measured dense-matmul TFLOP/s of this process: an `n x n` matmul, bf16 on CUDA (n=8192),
    fp32 on CPU (n=2048). `n=0` skips the probe (returns None)."""
    if n == 0:
        return None
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    secs = time_calls(lambda: torch.matmul(a, b, out=out), device, warmup=2 if cuda else 1,
                      repeats=repeats if cuda else max(3, repeats // 3))
    return 2.0 * n**3 / median(secs) / 1e12


def compile_forward(net: torch.nn.Module, **compile_kw: Any) -> torch.nn.Module:
    """Compile `net.forward` in place and return `net`. LightningDiT's `forward_cfg` calls `self.forward`
    directly (not `__call__`), so `torch.compile(net)` / `net.compile()` would leave the CFG passes of
    the DM loss and of the sampler eager; an instance attribute is seen by both paths."""
    net.forward = torch.compile(net.forward, **compile_kw)  # type: ignore[method-assign]
    return net


# ---- memory -------------------------------------------------------------------------------------

def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: `max_memory_allocated` since the last reset. CPU: the process's peak RSS (`ru_maxrss`,
    lifetime of the process: it includes everything run before in the same process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---- FLOPs --------------------------------------------------------------------------------------

def _cpu_sdpa_mapping() -> dict[Any, Callable]:
    """FLOP formulas for the CPU flash-attention kernels (missing from PyTorch's registry)."""
    aten = torch.ops.aten
    mapping: dict[Any, Callable] = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:
        mapping[fwd] = lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)
    if bwd is not None and bwd not in flop_counter.flop_registry:
        mapping[bwd] = lambda go, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(go, q, k, v)
    return mapping


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kw) -> int:
    """The input gradient and the weight gradient each cost one forward convolution. PyTorch's own formula
    ignores `groups` in the weight gradient and counts a depthwise convolution's backward ~groups x too high
    (65x the forward instead of 2x for a 64-channel 3x3 depthwise conv; Lite0's are all depthwise)."""
    fwd = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter_mode() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={**_cpu_sdpa_mapping(),
                                                          torch.ops.aten.convolution_backward: _conv_backward_flop})


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn()` (run once, for real, under the counter)."""
    with flop_counter_mode() as counter:
        fn()
    return int(counter.get_total_flops())


# ---- results ------------------------------------------------------------------------------------

@dataclass
class Result:
    """One table row: a benchmark at one configuration."""

    bench: str
    config: str
    device: str
    batch: int
    step_s: float                        # median seconds per timed call
    images_per_call: int                 # images a timed call processes
    flops_per_call: float | None = None  # model FLOPs of one timed call
    peak_tflops: float | None = None     # measured matmul peak of this process
    peak_mem_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images_per_call / self.step_s

    @property
    def tflops(self) -> float | None:
        return None if self.flops_per_call is None else self.flops_per_call / self.step_s / 1e12

    @property
    def pct_peak(self) -> float | None:
        t = self.tflops
        return None if t is None or not self.peak_tflops else 100.0 * t / self.peak_tflops

    @property
    def gflop_per_image(self) -> float | None:
        return None if self.flops_per_call is None else self.flops_per_call / self.images_per_call / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s, "tflops": self.tflops,
                "pct_peak": self.pct_peak, "gflop_per_image": self.gflop_per_image}


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[Result]) -> str:
    head = ["bench", "config", "device", "batch", "ms/call", "img/s", "GFLOP/img", "TFLOP/s", "% peak", "peak MiB"]
    body = [[r.bench, r.config, r.device, str(r.batch), _fmt(r.step_s * 1e3, ".1f"), _fmt(r.images_per_s, ".2f"),
             _fmt(r.gflop_per_image, ".2f"), _fmt(r.tflops, ".4f"), _fmt(r.pct_peak, ".1f"),
             _fmt(r.peak_mem_mib, ".0f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def report(rows: Sequence[Result], *, device: torch.device, peak_tflops: float | None, json_path: str | None,
           argv: Sequence[str] | None, notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the table (and the extras of each row); write `json_path`; return the same blob."""
    blob = {"machine": machine_info(device), "peak_tflops": peak_tflops, "argv": list(argv or []),
            "rows": [r.as_dict() for r in rows], "notes": notes or {}}
    peak = "-" if peak_tflops is None else f"{peak_tflops:.4f}"
    print(f"# {blob['machine']['cpu'] if device.type == 'cpu' else blob['machine'].get('gpu')}; "
          f"measured matmul peak {peak} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    print(format_table(rows))
    for r in rows:
        if r.extra:
            print(f"  {r.bench} {r.config}: " + ", ".join(f"{k}={_fmt_any(v)}" for k, v in r.extra.items()))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(blob, indent=1, default=str))
    return blob


def _fmt_any(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- command line -------------------------------------------------------------------------------

def base_parser(description: str, *, compile_flag: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (the trainers' run.precision)")
    p.add_argument("--steps", type=int, default=5, help="timed calls (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile happens here)")
    p.add_argument("--peak-n", type=int, default=None,
                   help="matrix side of the matmul peak probe (default 8192 CUDA / 2048 CPU; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON here")
    if compile_flag:
        p.add_argument("--compile", action="store_true", help="torch.compile the network(s) on the hot path")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Seed, threads and device from the common arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return pick_device(args.device)


def split_list(s: str) -> list[str]:
    return [x for x in (p.strip() for p in s.split(",")) if x]


__all__ = ["Result", "amp_dtype", "autocast", "base_parser", "compile_forward", "count_flops", "flop_counter_mode", "format_table",
           "machine_info", "matmul_peak", "median", "peak_memory_mib", "pick_device", "precision_label", "report",
           "reset_peak_memory", "setup", "split_list", "sync", "time_calls"]
