"""Training step time in float32 vs bf16 autocast, side by side; writes ``benchmarks/results/training_precision.md``.

    python benchmarks/bench_training_precision.py [--threads 1] [--batch 8] [--repeats 5]

One training step (forward, loss, backward, AdamW update) of the demo model (``recipes/demo_train.yaml``:
2.7 M parameters, 80 x 96 slices) on this machine's device, alternating the two precisions so that both
see the same machine load. bf16 autocast runs the convolutions and matmuls in bfloat16 while the
weights, gradients, optimiser state and loss stay float32 (``training.precision: bf16``). On a CPU the
gain depends on native bf16 support (AVX512-BF16 or AMX); without it bf16 can be slower.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from medidiff.data.paths import CHECKOUT as ROOT
from medidiff.outputs import write_text
from medidiff.recipes import load_recipe


def cpu_flags() -> str:
    """The bf16-related CPU flags (Linux), for the table's header."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    found = [f for f in flags if "bf16" in f or f.startswith("amx")]
    return ", ".join(found) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per precision (after one warm-up)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_precision.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    recipe = load_recipe(ROOT / "recipes" / "demo_train.yaml")
    torch.manual_seed(0)
    net = recipe.model.build(spatial_dims=2, in_channels=1).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 1, *recipe.data.size, device=device)
    t = torch.rand(args.batch, device=device) * 999

    def step(bf16: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x, t)
        loss = (out.float() - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    step(False), step(True)  # warm-up
    for _ in range(args.repeats):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    per_image = {k: statistics.median(v) / args.batch * 1000 for k, v in times.items()}
    lines = [
        "# Training step: float32 vs bf16 autocast",
        "",
        f"Demo model (`recipes/demo_train.yaml`), batch {args.batch} of {recipe.data.size[0]} x {recipe.data.size[1]}, "
        f"{device.type}, {args.threads} thread(s), {platform.processor() or platform.machine()}, bf16 CPU flags: "
        f"{cpu_flags()}. Median of {args.repeats} steps each, the precisions alternating.",
        "",
        "| precision | ms per image | images/s | speed-up |",
        "|---|---|---|---|",
    ]
    for bf16, name in ((False, "float32"), (True, "bf16 autocast")):
        ms = per_image[bf16]
        lines.append(f"| {name} | {ms:.1f} | {1000 / ms:.1f} | {per_image[False] / ms:.2f} |")
    write_text("\n".join(lines) + "\n", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
