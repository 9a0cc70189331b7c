"""Curated mutation check of the diffusion core: each mutant is a plausible wrong formula; the tests must catch it.

Each mutant replaces one exact piece of source text in a ``medidiff/core`` file (the text must occur exactly
once) and runs only the one to three test files that should catch it, with ``pytest -x -q``. Mutants are
applied to a private copy of ``medidiff/`` and ``tests/`` in a temporary folder, never to the working tree,
so a crash or an interrupt cannot leave a mutant behind and other work in the tree is undisturbed.

Usage::

    python scripts/mutants.py            # every mutant; exit status 1 if any survives
    python scripts/mutants.py -k dpm     # mutants whose name contains "dpm"
    python scripts/mutants.py --list

``tests/test_mutants.py`` runs it in the test suite and asserts that every mutant is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMED_OUT = -9


@dataclass(frozen=True)
class Mutant:
    """A source substitution and the tests that must catch it."""

    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root
    why: str = ""


S, P, L, D, N, G = ("medidiff/core/samplers.py", "medidiff/core/processes.py", "medidiff/core/losses.py",
                    "medidiff/core/denoiser.py", "medidiff/core/noise.py", "medidiff/core/schedules.py")
EXACT, ORACLE, PROC, DL, NOISE, GRIDS = ("tests/test_sampler_exact.py", "tests/test_samplers_oracle.py",
                                         "tests/test_processes.py", "tests/test_denoiser_losses.py",
                                         "tests/test_noise.py", "tests/test_time_grids.py")

def _k(path: str, expr: str) -> tuple[str, ...]:
    """Pytest arguments selecting the tests of ``path`` whose names match ``expr``."""
    return (path, "-k", expr)


MUTANTS: tuple[Mutant, ...] = (
    # samplers
    Mutant("corrector_step_zero", S, "    return 2 * alpha * (snr * z_norm", "    return 0 * alpha * (snr * z_norm",
           _k(EXACT, "corrector_step or langevin_step"), "the Langevin corrector does nothing"),
    Mutant("corrector_no_alpha", S, "alpha_i = (g.alpha[i] / g.alpha[i + 1]) ** 2", "alpha_i = 1.0",
           _k(EXACT, "corrector_step"), "Algorithm 5 without alpha_i = 1 - beta_i"),
    Mutant("corrector_per_sample_norms", S, "z_norm = z.flatten(1).norm(dim=1).mean()",
           "z_norm = z.flatten(1).norm(dim=1).max()", _k(EXACT, "corrector_step or langevin_step"),
           "not the batch-mean noise norm"),
    Mutant("dpm_solver_r_inverted", S, "r = h_prev / h", "r = h / h_prev", _k(EXACT, "dpm_solver"),
           "DPM-Solver++(2M)'s step ratio inverted"),
    Mutant("dpm_solver_first_order", S, "d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev", "d = x0",
           _k(EXACT, "dpm_solver"), "the multistep correction dropped"),
    Mutant("annealed_langevin_step_doubled", S, "level = 0.5 * step_lr * g.sigma[i] ** 2",
           "level = step_lr * g.sigma[i] ** 2", _k(EXACT, "stationary"), "Song & Ermon's alpha_i / 2 step doubled"),
    Mutant("ddim_invert_latent_zero", S, '"x0_hat": x0_hat})\n    return x\n', '"x0_hat": x0_hat})\n    return 0 * x\n',
           _k(EXACT, "inversion"), "the inversion's latent lost"),
    Mutant("ddim_eta1_variance_halved", S, "var = (eta * s_s) ** 2 * max(", "var = 0.5 * (eta * s_s) ** 2 * max(",
           _k(EXACT, "ancestral"), "half the ancestral posterior variance"),
    Mutant("ddim_eps_coefficient", S, "return a_s * x0 + math.sqrt(s_s**2 - var) * eps",
           "return a_s * x0 + s_s * eps", _k(EXACT, "ancestral"), "eta > 0 step keeps the full eps coefficient"),
    Mutant("reverse_sde_half_score", S, "return x - (drift - g**2 * score) * dt",
           "return x - (drift - 0.5 * g**2 * score) * dt", _k(ORACLE, "euler_maruyama and gaussian-2d"),
           "probability-flow drift in an SDE step"),
    Mutant("heun_first_order", S, "xh_next = xh + (h_s - h_t) * (d + d_next) / 2",
           "xh_next = xh + (h_s - h_t) * d_next", _k(EXACT, "converge"), "Heun's correction without the average"),
    Mutant("pf_ode_slope_at_next_level", S, "d = (xh - x0) / h_t", "d = (xh - x0) / h_s", _k(EXACT, "converge"),
           "Euler's slope divided by the wrong noise level"),
    Mutant("guidance_hook_gets_plain_x", S, "return hook(denoiser(x_in, tb), x_in, tb).detach()",
           "return hook(denoiser(x_in, tb), x, tb).detach()", _k(EXACT, "gradient_hook"),
           "the hook cannot differentiate with respect to x_t"),
    Mutant("nfe_corrector_count", S, "lambda steps, n_corrector, **_: steps * (n_corrector + 1)",
           "lambda steps, n_corrector, **_: steps * n_corrector + 1",
           _k(EXACT, "nfe"), "predictor-corrector's evaluation count"),
    # parametrisations and losses
    Mutant("score_from_x0_sigma", D, "return (alpha * x0_hat - x_t) / sigma**2",
           "return (alpha * x0_hat - x_t) / sigma", _k(DL, "exact_target"), "Tweedie's score with sigma, not sigma^2"),
    Mutant("v_to_x0_vp_only", D, "return (alpha * x_t - sigma * out) / (alpha**2 + sigma**2)",
           "return alpha * x_t - sigma * out", _k(DL, "exact_target"), "v-parametrisation right only for VP"),
    Mutant("min_snr_v_vp_only", L, "return clipped / ((snr + 1) * (alpha**2 + sigma**2))",
           "return clipped / (snr + 1)", _k(DL, "min_snr"), "Min-SNR v weight right only for VP"),
    # processes and schedules
    Mutant("vpsde_log_alpha", P, "return -0.25 * t**2 * (self.beta_max - self.beta_min)",
           "return -0.5 * t**2 * (self.beta_max - self.beta_min)", _k(PROC, "closed_form"),
           "VP marginal mean coefficient"),
    Mutant("subvp_diffusion_discount", P, "return -0.5 * bcast(beta, x) * x, torch.sqrt(beta * discount)",
           "return -0.5 * bcast(beta, x) * x, torch.sqrt(beta)", _k(PROC, "forward and SubVPSDE"),
           "sub-VP SDE with the VP diffusion"),
    Mutant("vesde_diffusion", P, "return torch.zeros_like(x), sigma * math.sqrt(2 * self._log_ratio)",
           "return torch.zeros_like(x), sigma * math.sqrt(self._log_ratio)", _k(PROC, "forward and VESDE"),
           "VE g(t) off by sqrt(2)"),
    Mutant("ddpm_interpolation", P, "return knots[lo] * (1 - w) + knots[lo + 1] * w",
           "return knots[lo + 1] * (1 - w) + knots[lo] * w", _k(PROC, "monai"), "DDPM alpha-bar read one step late"),
    Mutant("log_snr_halved", P, "return 2 * (self._log_alpha(t64) - torch.log(self._sigma(t64)))",
           "return self._log_alpha(t64) - torch.log(self._sigma(t64))", _k(PROC, "log_snr"),
           "log-SNR of alpha / sigma instead of its square"),
    Mutant("time_grid_clamped", G, "t[j:] = torch.linspace(float(t[j - 1]), t_min, m + 1, dtype=torch.float64)[1:]",
           "t[j:] = t_min", (GRIDS,), "repeated t_min times"),
    # noise
    Mutant("simplex_persistence_twice", N, "        amplitude *= persistence\n",
           "        amplitude *= persistence * persistence\n", _k(NOISE, "octaves"),
           "octave k weighted persistence^(2k)"),
    Mutant("simplex_normalise_total", N, "        out.div_(total)", "        out.div_(octaves)", _k(NOISE, "octaves"),
           "unnormalised octave sum divided by the octave count"),
)


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in ("medidiff", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _preload() -> None:
    """Import the heavy third-party modules once, so that forked test runs start in a fraction of a second."""
    import importlib

    for name in ("numpy", "torch", "scipy", "monai", "pydicom", "pytest", "hypothesis", "tqdm", "einops"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:
        import torch

        torch.set_num_threads(1)  # no OpenMP pool shared across fork()
    except ImportError:
        pass


def _pytest_args(mutant: Mutant) -> list[str]:
    # plain asserts: only pass/fail matters here, and rewriting every imported module costs seconds per run
    return ["-x", "-q", "-p", "no:cacheprovider", "--assert=plain", *mutant.tests]


def _run_forked(mutant: Mutant, work: Path, timeout: float) -> tuple[int, str]:
    """Run the mutant's tests with ``pytest.main`` in a forked child (medidiff is imported fresh there)."""
    log = work / ".mutant.log"
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(work)
            sys.path.insert(0, str(work))
            sys.dont_write_bytecode = True
            import pytest

            code = int(pytest.main(_pytest_args(mutant)))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return TIMED_OUT, "timed out"
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(status), log.read_text(errors="replace").strip()


def _run_subprocess(mutant: Mutant, work: Path, timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *_pytest_args(mutant)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return TIMED_OUT, "timed out"
    return proc.returncode, proc.stdout.strip()


def _run(mutant: Mutant, work: Path, timeout: float, fork: bool) -> tuple[int, str]:
    runner = _run_forked if fork and hasattr(os, "fork") else _run_subprocess
    return runner(mutant, work, timeout)


def check(mutant: Mutant, work: Path, timeout: float = 300.0, fork: bool = True) -> tuple[bool, float, str]:
    """Apply ``mutant`` in the copy at ``work``, run its tests, restore the file.

    Args:
        mutant: the mutation.
        work: a copy made by ``_copy_tree``.
        timeout: seconds before a run counts as caught (a mutant that hangs the tests is detected).
        fork: run the tests in a forked child of this (preloaded) process rather than a new interpreter.

    Returns:
        ``(caught, seconds, last line of pytest's output)``: caught when a test fails (pytest exit status 1),
        collection breaks (2) or the run times out.

    Raises:
        RuntimeError: the selection ran no test, or pytest failed to run (exit status 3-5).
    """
    target = work / mutant.path
    original = target.read_text()
    count = original.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: the text to replace occurs {count} times in {mutant.path}")
    target.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        code, out = _run(mutant, work, timeout, fork)
    finally:
        target.write_text(original)
    last = out.splitlines()[-1] if out else ""
    if code not in (0, 1, 2, TIMED_OUT):
        raise RuntimeError(f"mutant {mutant.name}: pytest exit status {code} for {' '.join(mutant.tests)}: {last}")
    return code != 0, time.perf_counter() - start, last


def run(names: list[Mutant] | None = None, verbose: bool = True, fork: bool = True,
        baseline: bool = True) -> dict[str, bool]:
    """Check every mutant (or ``names``) in a fresh temporary copy; ``{name: caught}``.

    Args:
        names: the mutants to check (default: all).
        verbose: print one line per mutant.
        fork: run tests in forked children of this process (fast) rather than new interpreters.
        baseline: first run each distinct test selection on the unmutated copy, which must pass (a selection
            that fails anyway would report every mutant as caught). The test suite, which runs those tests
            unmutated anyway, skips it; a no-op mutant is always checked to survive.

    Raises:
        RuntimeError: a test selection fails without a mutant, or selects no test.
    """
    mutants = list(MUTANTS if names is None else names)
    if fork:
        _preload()
    results = {}
    with tempfile.TemporaryDirectory(prefix="medidiff-mutants-") as tmp:
        work = Path(tmp)
        _copy_tree(work)
        first = mutants[0]  # the runner must report a mutant that changes nothing as surviving
        if check(Mutant("no-op", first.path, first.old, first.old, first.tests), work, fork=fork)[0]:
            raise RuntimeError(f"the unmutated tests {' '.join(first.tests)} fail")
        for tests in dict.fromkeys(m.tests for m in mutants) if baseline else ():
            code, out = _run(Mutant("baseline", "", "", "", tests), work, 600.0, fork)
            last = out.splitlines()[-1] if out else ""
            if code != 0:
                raise RuntimeError(f"the unmutated tests {' '.join(tests)} do not pass: {last}")
        for m in mutants:
            caught, seconds, last = check(m, work, fork=fork)
            results[m.name] = caught
            if verbose:
                print(f"{'caught  ' if caught else 'SURVIVED'} {m.name:34s} {seconds:5.1f}s  {m.path}  [{last}]",
                      flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the unmutated tests first")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.path:28s} {', '.join(m.tests)}  ({m.why})")
        return 0
    results = run(chosen, baseline=not args.no_baseline)
    survivors = [n for n, caught in results.items() if not caught]
    print(f"{len(results) - len(survivors)}/{len(results)} mutants caught" +
          (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
