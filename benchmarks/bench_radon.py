"""Side-by-side accuracy and speed of medidiff's torch Radon transform/FBP and scikit-image's ``radon``/``iradon``.

Both sides take the same Shepp-Logan phantom (zero outside the inscribed circle) and the same angles,
with ``circle=False`` (the whole image projected). Accuracy is the relative L2 difference to
scikit-image in float64 (sinogram; FBP with the ramp filter given scikit-image's sinogram). Speed is the
median wall-clock time of one call: scikit-image on one image (float64), medidiff on one image and per
image in a batch of 8 (float32, CPU); repeats alternate between the two sides so that both see the same
machine load. Also the time of medidiff's back-projector (the exact adjoint), which scikit-image lacks.

Run:  python benchmarks/bench_radon.py [--sizes 128 256] [--views 60 180] [--repeats 3] [--threads 1]
Writes benchmarks/results/radon.md.
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
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from medidiff.recon.ct import ParallelBeamCT, view_angles

BATCH = 8


def phantom(n: int) -> np.ndarray:
    img = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)
    yy, xx = np.ogrid[:n, :n]
    return img * (((yy - n // 2) ** 2 + (xx - n // 2) ** 2) <= (n // 2) ** 2)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def row(n: int, views: int, repeats: int) -> dict:
    img = phantom(n)
    theta = view_angles(views).numpy()
    op = ParallelBeamCT((n, n), theta)
    x64 = torch.from_numpy(img)[None, None]
    ref_sino = radon(img, theta, circle=False)
    ref_fbp = iradon(ref_sino, theta, output_size=n, circle=False)
    sino_err = rel(op(x64)[0, 0].numpy().T, ref_sino)
    fbp_err = rel(op.fbp(torch.from_numpy(ref_sino.T.copy())[None, None])[0, 0].numpy(), ref_fbp)

    x1 = x64.float()
    xb = x1.expand(BATCH, 1, n, n).contiguous()
    y1, yb = op(x1), op(xb)
    op(x1), op.fbp(y1), op.adjoint(y1)  # warm the grid cache
    t = {k: [] for k in ("sk_radon", "sk_iradon", "radon", "fbp", "adjoint", "radon_b", "fbp_b")}
    for _ in range(repeats):
        t["sk_radon"].append(timed(radon, img, theta, False))
        t["radon"].append(timed(op, x1))
        t["sk_iradon"].append(timed(lambda: iradon(ref_sino, theta, output_size=n, circle=False)))
        t["fbp"].append(timed(op.fbp, y1))
        t["adjoint"].append(timed(op.adjoint, y1))
        t["radon_b"].append(timed(op, xb) / BATCH)
        t["fbp_b"].append(timed(op.fbp, yb) / BATCH)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"n": n, "views": views, "sino_err": sino_err, "fbp_err": fbp_err, **med}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--views", type=int, nargs="+", default=[60, 180])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "radon.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row(n, v, args.repeats) for n in args.sizes for v in args.views]

    lines = [
        "# Radon transform and FBP: medidiff (torch) vs scikit-image",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} with {args.threads} thread(s); median of {args.repeats}. Shepp-Logan phantom, "
        "`circle=False`, angles evenly over 180 degrees. Error: relative L2 difference to scikit-image in "
        "float64. Seconds: one image (scikit-image float64; medidiff float32), and per image in a batch of "
        f"{BATCH} for medidiff. `python benchmarks/bench_radon.py` writes this file.",
        "",
        "| image | views | sinogram error | FBP error | skimage radon s | ours s | ours s/img (batch) "
        "| skimage iradon s | ours FBP s | ours FBP s/img (batch) | ours adjoint s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']}² | {r['views']} | {r['sino_err']:.1e} | {r['fbp_err']:.1e} | {r['sk_radon']:.3f} | "
            f"{r['radon']:.3f} | {r['radon_b']:.3f} | {r['sk_iradon']:.3f} | {r['fbp']:.3f} | {r['fbp_b']:.3f} | "
            f"{r['adjoint']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
