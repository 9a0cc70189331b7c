"""Sampler overhead: medidiff's ``ddim`` beside MONAI's ``DiffusionInferer.sample`` with a ``DDIMScheduler``.

Overhead = total sampling time / (network evaluations x bare forward time), on one MONAI
``DiffusionModelUNet`` (channels (32, 64, 64), attention at the last level, one residual block) in 2D
(batch 4, 64 x 64) and 3D (batch 1, 32^3). For each case the bare forward pass (``steps`` calls of the
MONAI module on one input), medidiff's ``ddim`` and MONAI's loop run interleaved within each repeat,
after a warm-up; the table reports medians over repeats. Network evaluations are counted with a forward
pre-hook in the warm-up run. Everything runs under ``torch.no_grad`` with torch's default thread count
unless ``--threads`` is given.

Because the ratio is only as steady as the machine, each sampler's own cost is also measured directly:
the same loops with the network replaced by a module that returns its input (milliseconds per step,
median of 30 runs). ``overhead - 1`` should be about that cost divided by the bare forward time.

Usage::

    python benchmarks/bench_samplers.py [--repeats 5] [--steps 20] [--cases 2d 3d] [--threads N] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import monai
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler

from medidiff.core.denoiser import Denoiser
from medidiff.core.processes import DDPM
from medidiff.core.samplers import ddim
from medidiff.nets import build_unet, count_parameters

CASES = {"2d": (2, (4, 1, 64, 64)), "3d": (3, (1, 1, 32, 32, 32))}
T = 1000


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _count_calls(module: torch.nn.Module, fn) -> int:
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


class _Identity(torch.nn.Module):
    """Stands in for the network to time a sampler's own work."""

    def forward(self, x, timesteps=None, context=None):
        return x


def _loops(net, monai_net, x1, steps):
    """medidiff's ``ddim`` and MONAI's inferer loop over ``net`` (a ``UNet``-like module) and ``monai_net``."""
    process = DDPM(T)
    denoiser = Denoiser(net, process, "eps")
    scheduler = DDIMScheduler(num_train_timesteps=T, clip_sample=False)
    scheduler.set_timesteps(steps)
    inferer = DiffusionInferer(scheduler)

    def ours():
        ddim(denoiser, x1, process, steps)

    def theirs():
        inferer.sample(x1, monai_net, scheduler, verbose=False)

    return {"medidiff": ours, "monai": theirs}


def run_case(name: str, steps: int, repeats: int) -> dict:
    """Time the bare network and both samplers for one case; medians over ``repeats``."""
    dims, shape = CASES[name]
    torch.manual_seed(0)
    net = build_unet(dims, channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1).eval()
    monai_net = net.net
    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    tsteps = torch.full((shape[0],), 500.0)
    loops = _loops(net, monai_net, x1, steps)
    ours, theirs = loops["medidiff"], loops["monai"]

    def bare():
        for _ in range(steps):
            monai_net(x1, tsteps)

    with torch.no_grad():
        bare()  # warm-up; the counting runs below warm the samplers up
        nfe = {"medidiff": _count_calls(monai_net, ours), "monai": _count_calls(monai_net, theirs)}
        times = {"bare": [], "medidiff": [], "monai": []}
        for _ in range(repeats):
            times["bare"].append(_timed(bare) / steps)
            times["medidiff"].append(_timed(ours))
            times["monai"].append(_timed(theirs))
        own = {}
        for k, fn in _loops(_Identity(), _Identity(), x1, steps).items():
            fn()
            own[k] = 1e3 * statistics.median(_timed(fn) for _ in range(30)) / steps
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": name,
        "shape": shape,
        "params": count_parameters(net),
        "bare_ms": 1e3 * med["bare"],
        "bare_spread": (1e3 * min(times["bare"]), 1e3 * max(times["bare"])),
        "samplers": {
            k: {"total_s": med[k], "nfe": nfe[k], "overhead": med[k] / (nfe[k] * med["bare"]),
                "overhead_min": min(times[k]) / (nfe[k] * min(times["bare"])),
                "own_ms": own[k],
                "spread": (min(times[k]), max(times[k]))}
            for k in ("medidiff", "monai")
        },
    }


def to_markdown(results: list[dict], args, load_before, load_after) -> str:
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    lines = [
        "# Sampler overhead: medidiff `ddim` vs MONAI `DiffusionInferer.sample` + `DDIMScheduler`",
        "",
        f"- command: `{cmd}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.platform()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}",
        f"- load average (1/5/15 min) before: {load_before}, after: {load_after}",
        f"- {args.steps} steps of a DDPM(T={T}) model, float32, `torch.no_grad`; interleaved, median of "
        f"{args.repeats} repeats after a warm-up",
        "- overhead = total / (NFE x bare forward), from medians (from minima: the same with the fastest repeat"
        " of each, less sensitive to other jobs); bare forward = the MONAI module called on the same input;",
        "  sampler-only = ms per step of the same loop with the network replaced by an identity module",
        "",
        "| case | params | bare forward ms (min-max) | sampler | total s (min-max) | NFE | overhead "
        "| overhead from minima | sampler-only ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = "x".join(str(s) for s in r["shape"])
        bare = f"{r['bare_ms']:.1f} ({r['bare_spread'][0]:.1f}-{r['bare_spread'][1]:.1f})"
        for k, v in r["samplers"].items():
            total = f"{v['total_s']:.3f} ({v['spread'][0]:.3f}-{v['spread'][1]:.3f})"
            lines.append(f"| {r['case']} {shape} | {r['params'] / 1e6:.2f} M | {bare} | {k} | {total} | {v['nfe']} "
                         f"| {v['overhead']:.3f} | {v['overhead_min']:.3f} | {v['own_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "samplers.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results = [run_case(name, args.steps, args.repeats) for name in args.cases]
    load_after = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = to_markdown(results, args, load_before, load_after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
