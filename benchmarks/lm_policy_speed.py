"""The LM policy's cost on one batch of a dataset: forward + backward of BC's loss, wall-clock and peak memory.

The policy is llmprior.policy's (bc.py's and gflan_prior.py's): the batch is the first --prompts samples of the
dataset shuffled with --seed, as BC's first step would draw them; it runs --repeats times. Peak memory is the
process's maximum resident set size (CPU) or torch's peak allocation (CUDA). Prints one JSON line; writes nothing.

    python benchmarks/lm_policy_speed.py --dataset data/alfworld-pick_6500.jsonl --prompts 8
    python benchmarks/lm_policy_speed.py --dataset data/overcooked-salad_1000.jsonl --prompts 32 --trunk-cache-mb 0
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmprior.data import load_dataset  # noqa: E402
from llmprior.policy import load_policy  # noqa: E402
from llmprior.prompts import default_policy_history, policy_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="an offline dataset, e.g. data/alfworld-pick_6500.jsonl")
    parser.add_argument("--model", default="smollm2", help="the policy LM (as --policy.model)")
    parser.add_argument("--lora-layers", type=int, default=8)
    parser.add_argument("--trunk-cache-mb", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=8, help="samples in the batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    header, records = load_dataset(args.dataset)
    history = default_policy_history(header["env"])
    # bc.py's samples: the prompt with the episode's previous steps, the admissible actions, the data action's index
    by_episode: dict = {}
    for r in records:
        by_episode.setdefault(r["episode"], []).append(r)
    samples = []
    for episode in by_episode.values():
        episode.sort(key=lambda r: r["step"])
        for i, r in enumerate(episode):
            past = [(p["obs"], p["action"]) for p in episode[max(0, i - history) : i]] if history > 0 else []
            samples.append({"prompt": policy_prompt(r["task"], r["obs"], r["admissible"], past),
                            "actions": list(r["admissible"]), "index": r["admissible"].index(r["action"])})  # fmt: skip
    batch = [samples[int(i)] for i in np.random.default_rng(args.seed).permutation(len(samples))[: args.prompts]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(args.model, device, args.lora_layers, trunk_cache_mb=args.trunk_cache_mb)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    for _ in range(args.repeats):
        start = time.time()
        scores, _ = policy([s["prompt"] for s in batch], [s["actions"] for s in batch])
        actions = torch.as_tensor([s["index"] for s in batch], device=device)
        loss = -torch.log_softmax(scores, dim=-1).gather(1, actions.unsqueeze(1)).mean()  # bc.py's bc_loss
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
