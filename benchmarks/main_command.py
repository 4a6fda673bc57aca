"""The README's main command, `python dqn_prior.py`, timed as a new user meets it: first on a fresh machine (empty
HOME and cache: the embedded GGUF is assembled and read, every LLM query runs), then once more (the model's config and
tokenizer come from the cache folder, every query from the score cache).

Each run is a child process whose HOME and $LLMPRIOR_CACHE are a new temporary folder (the second run reuses the
first's), with its run folder there too, and torch's default threads unless OMP_NUM_THREADS is set. Reported per run:
wall-clock seconds of the whole process (imports, model loads, training, evaluations), its peak RSS, the LLM queries
and the final evaluation's success rate from the script's `summary` line, and the CPU it ran on.

    python benchmarks/main_command.py                      # the README's command: fresh, then again
    python benchmarks/main_command.py -- --total-timesteps 200 --eval-freq 100 --eval-episodes 2

Writes results/main_command.csv (a row per phase and argument list; rows of other selections are kept).
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, _key, common_parser, git_commit, markdown_table, merge_rows, write_csv  # noqa: E402

ENTRY = "main_command"
KEY = ["phase", "arguments", "threads"]


def cpu() -> str:
    """The CPU's model name, its core count, and whether it has AVX-512 (what the LLM's matrix products run on)."""
    name, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores" + (", AVX-512" if " avx512f" in flags else "")


def run_once(script_args: list[str], home: str, phase: str) -> dict:
    """One `python dqn_prior.py ...` in its own process; its output goes to `<home>/log_<phase>.txt`."""
    env = dict(os.environ, HOME=home, LLMPRIOR_CACHE=os.path.join(home, ".cache", "llmprior"))
    log_path = os.path.join(home, f"log_{phase}.txt")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "dqn_prior.py", *script_args, "--runs-dir",
                                  os.path.join(home, "runs")], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    with open(log_path) as log:
        lines = log.read().splitlines()
    if code:
        raise RuntimeError(f"dqn_prior.py exited with {code}: {lines[-1] if lines else ''} (log: {log_path})")
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("summary "))[len("summary "):])
    return {"wall_s": round(wall, 1), "minutes": round(wall / 60, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "llm_queries": summary.get("prior_queries"), "final_success": summary.get("eval/success_rate"),
            "env_steps": summary.get("global_step")}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    args = parser.parse_args(argv)
    command = "python dqn_prior.py" + "".join(" " + shlex.quote(a) for a in args.extra)
    if args.dry_run:
        print(f"would run `{command}` twice, in a fresh HOME")
        return 0
    commit, machine, rows = git_commit(), cpu(), []
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    with tempfile.TemporaryDirectory(prefix="main_command_") as home:
        for phase in ("fresh", "again"):
            print(f"{phase}: {command}", flush=True)
            result = run_once(list(args.extra), home, phase)
            rows.append({"phase": phase, "arguments": " ".join(args.extra), "threads": threads, **result,
                         "cpu": machine, "commit": commit, "command": command})  # fmt: skip
            print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    path = os.path.join(args.results_dir, f"{ENTRY}.csv")
    write_csv(merge_rows(path, rows, KEY, {_key(r, KEY) for r in rows}), path)
    print(markdown_table(rows, ["phase", "threads", "minutes", "llm_queries", "final_success", "peak_rss_mb", "cpu"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
