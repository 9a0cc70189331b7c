"""Side-by-side speed of medidiff's batched simplex noise and one-image-at-a-time NumPy/opensimplex noise.

The reference is how AnoDDPM-style code makes simplex noise (Wyatt et al. 2022): for each image, for
each of 6 octaves, one ``opensimplex.noise2array`` (``noise3array`` in 3D) call on pixel coordinates
divided by the octave's period, summed with weights ``persistence**k``, then normalised. Both sides
make the same sizes with the same octave periods; medidiff's timings include generating the seeds'
permutations. Repeats alternate between the two sides so that both see the same machine load.

Run:  python benchmarks/bench_noise.py [--repeats 7] [--baseline-repeats 3] [--threads 1]
Writes benchmarks/results/noise.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medidiff.core.noise import make_generators, simplex

OCTAVES, PERSISTENCE, FREQUENCY = 6, 0.8, 4.0  # FREQUENCY cells per image side at the first octave


def reference(batch: int, spatial: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """AnoDDPM-style noise: per image, per octave, one opensimplex array call; then normalised."""
    import opensimplex

    axes = [np.arange(n, dtype=np.float64) for n in reversed(spatial)]  # opensimplex takes x, y(, z)
    period = max(spatial) / FREQUENCY  # pixels per lattice unit at the first octave
    out = np.empty((batch, 1, *spatial))
    for b in range(batch):
        opensimplex.seed(seed + b)
        noise, amplitude, p = np.zeros(spatial), 1.0, period
        for _ in range(OCTAVES):
            args = [a / p for a in axes]
            noise += amplitude * (
                opensimplex.noise2array(*args) if len(spatial) == 2 else opensimplex.noise3array(*args)
            )
            p /= 2
            amplitude *= PERSISTENCE
        out[b, 0] = (noise - noise.mean()) / noise.std()
    return out


def ours(batch: int, spatial: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """medidiff's batched simplex noise with one generator per sample."""
    gens = make_generators(list(range(seed, seed + batch)))
    return simplex((batch, 1, *spatial), octaves=OCTAVES, persistence=PERSISTENCE, frequency=FREQUENCY, generator=gens)


def timed(fn, *args) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of medidiff's noise per case")
    parser.add_argument("--baseline-repeats", type=int, default=3, help="timed repeats of the 2D reference")
    parser.add_argument("--baseline-repeats-3d", type=int, default=1, help="timed repeats of the 3D reference")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for medidiff's noise")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "noise.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import opensimplex

    cases = [("2D", 8, (128, 128), args.baseline_repeats), ("3D", 8, (32, 32, 32), args.baseline_repeats_3d)]
    load_before = os.getloadavg()
    rows = []
    for name, batch, spatial, base_repeats in cases:
        ours(batch, spatial)  # warm-up
        t_ours, t_ref = [], []
        for r in range(max(args.repeats, base_repeats)):
            if r < args.repeats:
                t_ours.append(timed(ours, batch, spatial))
            if r < base_repeats:
                t_ref.append(timed(reference, batch, spatial))
        m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
        size = f"{batch} × {'×'.join(map(str, spatial))}"
        rows.append(
            f"| {name} | {size} | {m_ours * 1e3:.1f} (n={len(t_ours)}) | {m_ref * 1e3:.0f} (n={len(t_ref)}) "
            f"| {m_ref / m_ours:.0f}× |"
        )
        print(rows[-1], flush=True)
    load_after = os.getloadavg()

    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join(
        [
            "# Simplex noise: medidiff (batched, torch) vs one image at a time (NumPy/opensimplex)",
            "",
            f"Command: `{cmd.strip()}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
            f"shared; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the run. "
            f"torch {torch.__version__} with {args.threads} thread(s); numpy {np.__version__}; "
            f"opensimplex {getattr(opensimplex, '__version__', 'installed')} (pure Python, no numba).",
            "",
            f"Settings: {OCTAVES} octaves, persistence {PERSISTENCE}, first octave {FREQUENCY:g} lattice cells per "
            "image side (opensimplex: coordinates divided by a period of side/4 px, halved per octave), "
            "one seed per image, each image normalised to zero mean and unit variance. Times are medians "
            "of n wall-clock repeats, the two sides alternating.",
            "",
            "| case | size (B × spatial) | medidiff `simplex` (ms) | opensimplex per image (ms) | speed-up |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
