"""HappyFaces: curvature directions that separate a CNN's reliance on the face from its reading of the writing.

Train a small CNN on the labeled set only (face and writing agree), build face / text probes from the
same images (writing band masked / face masked), find v_face and v_text (top probe-curvature
eigenvectors with the other probe's top-k projected out), size each on probe data, and measure on the
validation set (accuracy against face labels and against writing labels; changes are perturbed minus
unperturbed, mean over +-t). Random directions of the same norms are the control. Two heads (the model
moved along v_text for the face head, along v_face for the text head; step and sign chosen on synthetic
swapped images) give the benchmark's score: the worse head's validation accuracy. The baseline in the
same run: the unperturbed model used as both heads. Writes happyfaces.json to --out. Last line: one JSON
object.

    PYTHONPATH=src python benchmarks/hessian_happyfaces.py [--seeds 10 11 12 13 14] [--data ../shared/data/happyfaces]
    PYTHONPATH=src python benchmarks/hessian_happyfaces.py --merge A/happyfaces.json B/happyfaces.json --out C
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerlab.data.images import read_happyfaces
from steerlab.hessian.happyfaces import SUMMARY_KEYS, HappyFacesConfig, run_experiment, summarise
from steerlab.io import atomic_write_text

HEADLINE = (
    "face_dir_face_change",
    "face_dir_text_change",
    "text_dir_text_change",
    "text_dir_face_change",
    "random_max_change",
    "worst_head_acc",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "happyfaces")
    )
    parser.add_argument("--size", type=int, default=HappyFacesConfig.size)
    parser.add_argument("--out", default="results/hessian_happyfaces")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="summarise the runs of earlier outputs instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        runs = sorted((r for part in parts for r in part["runs"]), key=lambda r: r["seed"])
        result = {"config": parts[0]["config"], "summary": summarise(runs), "runs": runs}
    else:
        labeled = read_happyfaces(Path(args.data) / "labeled_sets.tar.gz", args.size, option="--data")
        val = read_happyfaces(Path(args.data) / "validation_sets.tar.gz", args.size, option="--data")
        result = run_experiment(labeled, val, args.seeds, HappyFacesConfig(size=args.size))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "happyfaces.json", json.dumps(result, indent=1, default=float))
    for run in result["runs"]:
        print(
            run["seed"],
            {k: round(run[k], 3) for k in SUMMARY_KEYS},
            "base",
            {k: round(v, 3) for k, v in run["base_validation"].items()},
            "sizes",
            run["sizes"],
            flush=True,
        )
    s = result["summary"]
    print(
        json.dumps(
            {k: s[k] for k in SUMMARY_KEYS if f"{k}_ci95" in s}
            | {"ci95": {k: s[f"{k}_ci95"] for k in SUMMARY_KEYS if f"{k}_ci95" in s}}
        )
    )
    line = {k: s[k] for k in HEADLINE}
    line |= {
        "base_worst_head_acc": s["base_worst_head_acc"],
        "n_seeds": s["n_seeds"],
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
