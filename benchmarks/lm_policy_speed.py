"""The LM policy's cost on one batch of a dataset: forward + backward of BC's loss, wall-clock and peak memory.

The policy is bc.py's (the same code as gflan_prior.py's): the batch is the first --prompts samples of the dataset
shuffled with --seed, as BC's first step would draw them; it runs --repeats times. Peak memory is the process's
maximum resident set size (CPU) or torch's peak allocation (CUDA). Prints one JSON line; nothing is written.

    python benchmarks/lm_policy_speed.py --dataset data/alfworld-pick_6500.jsonl --prompts 8
    python benchmarks/lm_policy_speed.py --dataset data/overcooked-salad_1000.jsonl --prompts 32 -- --trunk-cache-mb 0

Arguments after `--` are bc.py's PolicyArgs (without the `--policy.` prefix), e.g. `--model gemma --device cuda`.
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="an offline dataset, e.g. data/alfworld-pick_6500.jsonl")
    parser.add_argument("--prompts", type=int, default=8, help="samples in the batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args, rest = parser.parse_known_args()
    policy_args = tyro.cli(bc.PolicyArgs, args=[a for a in rest if a != "--"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    header, records = bc.load_dataset(args.dataset)
    samples = bc.bc_samples(records, policy_args.history if policy_args.history is not None
                            else bc.default_policy_history(header["env"]))  # fmt: skip
    batch = [samples[int(i)] for i in np.random.default_rng(args.seed).permutation(len(samples))[: args.prompts]]
    device = torch.device(policy_args.device if policy_args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    policy = bc.load_policy(policy_args, device)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    for _ in range(args.repeats):
        start = time.time()
        scores, _ = policy([s["prompt"] for s in batch], [s["actions"] for s in batch])
        loss = bc.bc_loss(scores, torch.as_tensor([s["index"] for s in batch], device=device))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(round(time.time() - start, 2))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    print(json.dumps({"dataset": args.dataset, "prompts": len(batch),
                      "actions": sum(len(s["actions"]) for s in batch), "device": str(device),
                      "loss": round(loss.item(), 6), "forward_backward_s": seconds, "peak_mb": round(peak),
                      "rss_after_load_mb": round(loaded_mb)}))  # fmt: skip


if __name__ == "__main__":
    main()
