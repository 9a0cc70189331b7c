"""Build the anomaly-detection demo cases in ``data/demo/`` from the bundled MNI152 brain.

    python scripts/make_demo_cases.py [--out data/demo] [--seed 2024]

The cases are slabs of axial slices that ``recipes/demo_train.yaml`` holds out of training
(``holdout: [[34, 42], [52, 56]]``), written as small NIfTI volumes with the template's true affine
(shifted to the slab):

- ``demo_lesion_{1,2,3}``: slab z = 34..41 with three inserted lesions each (``medidiff.data.lesions``,
  seeded, mixed hyper/hypo-intense, radius 4-10 mm, relative contrast 0.3-0.6), with their lesion masks;
- ``demo_healthy``: the same slab without lesions (its lesion mask is empty);
- ``demo_calibration``: slab z = 52..55, healthy, for calibrating the detection threshold.

Every case has the brain mask of the template. ``cases.json`` and ``calibration.json`` are MONAI-style
datalists with ``image``, ``label`` and ``mask`` entries. Deterministic: the same seed writes the same
files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medidiff import outputs
from medidiff.data import sample
from medidiff.data.lesions import insert_lesions

SLAB = (34, 42)
CALIBRATION = (52, 56)
N_LESION_CASES = 3
LESIONS_PER_CASE = 3
RADIUS_MM = (4.0, 10.0)
CONTRAST = (0.3, 0.6)
SPACING = 2.0
ROOT = Path(__file__).resolve().parents[1]


def slab_affine(affine: np.ndarray, z0: int) -> np.ndarray:
    """The affine of a slab starting at slice ``z0`` of a volume with ``affine``."""
    shift = np.eye(4)
    shift[2, 3] = z0
    return affine @ shift


def lesion_volume(volume: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The whole brain with ``LESIONS_PER_CASE`` lesions centred inside the demo slab, and their mask.

    Lesions are inserted one at a time into the full volume, so a lesion may reach beyond the slab as a
    real one would; each lesion's centre is kept inside the slab (one slice in from its faces) and away
    from the earlier lesions.
    """
    image = volume[None].astype(np.float32)
    lesions = np.zeros(volume.shape, dtype=bool)
    inner = ndimage.binary_erosion(brain, iterations=2)
    for _ in range(LESIONS_PER_CASE):
        radius = float(rng.uniform(*RADIUS_MM))
        reach = int(np.ceil((radius * 1.3 + 1.4) / SPACING))  # insert_lesions' reach, in slices
        region = inner.copy()
        region[..., : SLAB[0] + 1 - reach] = False
        region[..., SLAB[1] - 1 + reach:] = False
        region &= ~ndimage.binary_dilation(lesions, iterations=2)
        image, mask = insert_lesions(image, mask=region, spacing=SPACING, n=1, radius_mm=radius,
                                     contrast=CONTRAST, polarity="both", seed=rng)
        lesions |= mask[0]
    return image[0], lesions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    out: Path = args.out
    rng = np.random.default_rng(args.seed)
    t1 = sample.brain_volume()
    affine = t1.affine.numpy()
    volume = t1.as_tensor()[0].numpy().astype(np.float32)
    brain = sample.brain_mask().as_tensor()[0].numpy().astype(bool)

    def write(array: np.ndarray, name: str, z: tuple[int, int], dtype) -> str:
        sl = np.ascontiguousarray(array[..., z[0]:z[1]])
        path = out / f"{name}.nii.gz"
        outputs.write_nifti(torch.from_numpy(sl.astype(dtype)), path, slab_affine(affine, z[0]), dtype=dtype)
        return path.name

    def entry(name: str, image: np.ndarray, label: np.ndarray | None, z: tuple[int, int]) -> dict[str, str]:
        item = {"image": write(np.rint(image), name, z, np.int16),
                "mask": write(brain, f"{name}_brainmask", z, np.uint8)}
        if label is not None:
            item["label"] = write(label, f"{name}_lesions", z, np.uint8)
        return item

    cases = []
    for k in range(N_LESION_CASES):
        image, lesions = lesion_volume(volume, brain, rng)
        cases.append(entry(f"demo_lesion_{k + 1}", image, lesions, SLAB))
    cases.append(entry("demo_healthy", volume, np.zeros_like(brain), SLAB))
    calibration = [entry("demo_calibration", volume, None, CALIBRATION)]
    outputs.write_json({"description": "medidiff demo cases: slab z=34..41 of the MNI152 brain, 3 with lesions",
                   "test": cases}, out / "cases.json")
    outputs.write_json({"description": "medidiff demo calibration: healthy slab z=52..55 of the MNI152 brain",
                   "test": calibration}, out / "calibration.json")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(cases) + 1} cases to {out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
