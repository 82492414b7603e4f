"""Hybrid-digits separation experiment: targeted ±t perturbations, random baseline, specialised fractions.

Config (including t) was fixed on development seeds 0-2; this script reports fresh seeds 10-14.
Writes hybrid_digits.json, figures and report.html to --out. Last line: one JSON object.

    PYTHONPATH=src python benchmarks/hessian_hybrid.py [--seeds 10 11 12 13 14] [--out results/hessian_hybrid]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerlab.hessian.hybrid import SUMMARY_KEYS, HybridConfig, run_experiment
from steerlab.hessian.report import hybrid_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    parser.add_argument("--out", default="results/hessian_hybrid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = run_experiment(args.seeds, HybridConfig())
    hybrid_report(result, Path(args.out))
    for run in result["runs"]:
        print(
            run["seed"],
            {k: round(run[k], 3) for k in SUMMARY_KEYS},
            "pattern/digit-specialised (mixed, ica):",
            run["n_pattern_specialised"],
            run["n_digit_specialised"],
        )
    s = result["summary"]
    s["pattern_dir_ratio"] = s["pattern_drop_on_pattern_dir"] / max(s["digit_drop_on_pattern_dir"], 1e-12)
    s["digit_dir_ratio"] = s["digit_drop_on_digit_dir"] / max(s["pattern_drop_on_digit_dir"], 1e-12)
    s["seconds"] = time.perf_counter() - t0
    print(json.dumps(s))


if __name__ == "__main__":
    main()
