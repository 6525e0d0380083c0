"""bernoulli_weight on the fidelity benchmark's cnn128 task with another uniform mix.

approxdist.functional.sampling.EPSILON (the share of the uniform distribution mixed into
the weight-norm one; 0.1 in the library) is set per run, then the run is the benchmark's
own (approxdist.bench.fidelity.run_one: 200 steps, batch 32, SGD momentum 0.9).

    python experiments/tools/ab_bernoulli_mix.py OUT.json EPS[,EPS..] RATIO[,RATIO..] SEED[,SEED..] [LR]
"""
import json
import sys

import torch

import approxdist.functional.sampling as sampling
from approxdist.bench import fidelity


def main(out, mixes, ratios, seeds, lr=0.1):
    torch.set_num_threads(1)
    data = fidelity.task_data("cnn128")
    runs = []
    for eps in mixes:
        sampling.EPSILON = eps
        for ratio in ratios:
            for seed in seeds:
                r = fidelity.run_one("cnn128", f"{ratio}+policybernoulli_weight", seed, steps=200, lr=lr,
                                     batch_size=32, eval_every=10, target=0.97, data=data)
                r.update(epsilon=eps, lr=lr)
                runs.append(r)
                print(eps, ratio, seed, lr, r["final_acc"], r["steps_to_target"], r["curve"][-1][2], flush=True)
                with open(out, "w") as f:
                    json.dump({"benchmark": "fidelity, bernoulli_weight with another uniform mix", "runs": runs},
                              f, indent=1)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], [float(e) for e in a[1].split(",")], a[2].split(","), [int(s) for s in a[3].split(",")],
         float(a[4]) if len(a) > 4 else 0.1)
