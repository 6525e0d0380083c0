"""Merge docs/fidelity.json's exact / 0.5 / 0.33 runs with saved schedule runs, for one table.

Those runs predate the payload columns; their payload fraction is constant per step
(topk_weight keeps k of n channels every step) and was measured with
approxdist.bench.fidelity.payload_elements on one forward of each model.

    python experiments/tools/merge_fidelity_runs.py OUT.json RUNS.json [RUNS.json ...]
    approxdist-bench fidelity --render OUT.json
"""
import json
import sys

FRACTION = {("cnn128", "0.5"): 0.50097, ("cnn128", "0.33"): 0.32951, ("resnet18", "0.5"): 0.50085,
            ("resnet18", "0.33"): 0.32927}


def main(out, paths):
    with open("docs/fidelity.json") as f:
        base = json.load(f)
    runs = []
    for r in base["runs"]:
        if r["config"] not in ("exact", "0.5", "0.33"):
            continue
        frac = 1.0 if r["config"] == "exact" else FRACTION[(r["task"], r["config"])]
        hit = r["steps_to_target"]
        runs.append(dict(r, payload_fraction=frac, payload_to_target=None if hit is None else round(hit * frac, 3)))
    for path in paths:
        with open(path) as f:
            runs += json.load(f)["runs"]
    note = ("merged: exact/0.5/0.33 from docs/fidelity.json (payload fraction constant, from one forward), "
            "the rest from " + ", ".join(paths))
    doc = {"benchmark": "fidelity", "options": dict(base["options"], note=note), "runs": runs,
           "environment": base["environment"]}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
