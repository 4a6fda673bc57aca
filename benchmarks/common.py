"""What the benchmark entries share: run the scripts' CLIs resumably, one CSV row per run, means and standard errors.

Not a framework: an entry builds a list of `Job`s (a script and its arguments, plus the columns that name the run),
`run_jobs` runs the ones that have not finished, `save_results` reads what they wrote into `results/*.csv`.

Layout: every job gets its own folder `<runs-dir>/<entry>/<job name>/`, passed to the script as `--runs-dir`, so the
script's own run folder lands inside it. Next to it `job.json` records the exact command, the git commit it ran at,
its wall-clock, peak memory (max RSS) and exit status; `log.txt` has its output. A job is finished when its run
folder holds a `summary.json`. An interrupted job is resumed from its `checkpoint.pt` (every script has `--resume`).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
BUDGETS = ("smoke", "small", "paper")


@dataclass
class Job:
    """One run of a script. `key` names it (and becomes the first CSV columns): env, algo, seed, ..."""

    key: dict
    script: str
    args: list = field(default_factory=list)

    @property
    def without_prior(self) -> bool:
        """`--k 0`: DQN, CQL, GFlan."""
        args = list(map(str, self.args))
        return any(a == "--k" and v == "0" for a, v in zip(args, args[1:]))

    @property
    def name(self) -> str:
        return "__".join(name_part(v) for v in self.key.values())

    def command(self, job_dir: str) -> list:
        return [self.script, *map(str, self.args), "--runs-dir", job_dir]


# An env spec's `/`, `:`, `,`, `=` (`mymodule:MyEnv,size=4`, `llmprior/frozenlake-v0`) and spaces, in a file name
_NAME_CHARS = str.maketrans({"/": "-", ":": "-", ",": "-", "=": "-", " ": None})


def name_part(value) -> str:
    """A value (an env spec, an algorithm's name, a seed) as part of a file name: `mymodule:MyEnv,size=4` ->
    `mymodule-MyEnv-size-4`, `CQL (mean TD)` -> `CQL(meanTD)`."""
    return str(value).translate(_NAME_CHARS)


def dataset_spec(spec: str) -> tuple[str, int]:
    """`<env>:<transitions>` (the env itself may hold a `:`, as `mymodule:MyEnv`) -> (env, transitions)."""
    env, n = spec.rsplit(":", 1)
    return env, int(n)


def common_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=BUDGETS, default="small",
                        help="smoke: a few steps (CI); small: this repo's CPU numbers; paper: the paper's sizes (GPU)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="override the budget's seeds")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "benchmarks"))
    parser.add_argument("--results-dir", default=RESULTS, help="where the CSV files go")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--collect-only", action="store_true", help="write the CSV from finished runs, run nothing")
    parser.add_argument("extra", nargs="*", help="more arguments for every script run, after -- "
                        "(e.g. -- --prior.model Qwen/Qwen1.5-7B --prior.backend vllm)")  # fmt: skip
    return parser


# The extra arguments an entry passes to every run, minus those a script does not have ("--x." is a prefix).
NOT_TAKEN = {
    "dqn_prior.py": ("--policy.", "--eval-k", "--eval-prior-model", "--load-model", "--allow-mismatch"),
    "cql_prior.py": ("--policy.",),
    "gflan_prior.py": ("--encoder", "--eval-k", "--eval-prior-model", "--load-model", "--allow-mismatch",
                       "--authors-code"),
    "bc.py": ("--prior.", "--k", "--eval-k", "--eval-prior-model", "--encoder", "--authors-code", "--load-model",
              "--allow-mismatch"),
}  # fmt: skip


def split_args(extra: list, flags: tuple) -> tuple[list, list]:
    """`extra` -> (the given flags with their values, the rest); a flag ending in "." is a prefix."""
    def matches(flag: str) -> bool:
        name = flag.split("=")[0]
        return any(name.startswith(f) if f.endswith(".") else name == f for f in flags)

    picked, rest, take = [], [], False
    for a in extra:
        if a.startswith("--"):
            take = matches(a)
        (picked if take else rest).append(a)
    return picked, rest


def drop_args(extra: list, flags: tuple) -> list:
    """`extra` without the given flags and their values."""
    return split_args(extra, flags)[1]


def prior_args(extra: list) -> list:
    """The `--prior.*` arguments (with their values) among `extra`."""
    return split_args(extra, ("--prior.",))[0]


def git_commit() -> str:
    """The commit the code runs at, `-dirty` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=ROOT).returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


class Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise Terminated()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SECRET_FLAGS = ("--prior.api-key", "--prior.api_key")


def hide_secrets(cmd: list) -> list[str]:
    """A command line as it may be printed or stored: the value of an API-key flag becomes ***."""
    out = []
    for i, arg in enumerate(map(str, cmd)):
        flag, eq, _ = arg.partition("=")
        if i and str(cmd[i - 1]) in SECRET_FLAGS:
            out.append("***")
        elif eq and flag in SECRET_FLAGS:
            out.append(f"{flag}=***")
        else:
            out.append(arg)
    return out


def show_path(arg) -> str:
    """An argument as a reader should see it: paths inside the repo relative to it."""
    arg = str(arg)
    if os.path.isabs(arg) and os.path.commonpath([arg, ROOT]) == ROOT:
        return os.path.relpath(arg, ROOT)
    return arg


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run_dir_of(job_dir: str) -> Optional[str]:
    """The script's run folder inside a job folder (the newest if several)."""
    dirs = sorted((d for d in glob.glob(os.path.join(job_dir, "*")) if os.path.isdir(d)), key=os.path.getmtime)
    return dirs[-1] if dirs else None


def finished(job_dir: str) -> bool:
    run_dir = run_dir_of(job_dir)
    return run_dir is not None and os.path.exists(os.path.join(run_dir, "summary.json"))


def run_jobs(jobs: list[Job], entry_dir: str, extra: Iterable[str] = (), dry_run: bool = False) -> list[str]:
    """Run every unfinished job, one after the other (the scripts use all cores). -> names of the failed jobs."""
    failed, extra = [], list(extra)
    for i, job in enumerate(jobs, 1):
        job_dir = os.path.join(entry_dir, job.name)
        not_taken = NOT_TAKEN.get(job.script, ())
        if job.without_prior:  # a prior-free baseline refuses prior flags it would ignore
            not_taken += ("--prior.",)
        cmd = job.command(job_dir) + drop_args(extra, not_taken)
        if finished(job_dir):
            print(f"[{i}/{len(jobs)}] done already: {job.name}", flush=True)
            continue
        run_dir = run_dir_of(job_dir)
        ckpt = os.path.join(run_dir, "checkpoint.pt") if run_dir else None
        resume = ["--resume", ckpt] if ckpt and os.path.exists(ckpt) else []  # every script takes --resume
        # the CSV keeps the command that reproduces the run; --resume is how this attempt continues it
        shown, shown_now = (f"python {shlex.join(map(show_path, hide_secrets(c)))}" for c in (cmd, cmd + resume))
        cmd += resume
        if dry_run:
            print(shown_now)
            continue
        os.makedirs(job_dir, exist_ok=True)
        meta = {"command": shown, "commit": git_commit(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
        job_json = os.path.join(job_dir, "job.json")
        earlier = {}  # an earlier attempt that failed and left its job.json: this one adds to its time and memory
        if resume and os.path.exists(job_json):
            with open(job_json) as f:
                earlier = json.load(f)
        print(f"[{i}/{len(jobs)}] {shown_now}\n        log: {show_path(job_dir)}/log.txt", flush=True)
        start = time.time()
        with open(os.path.join(job_dir, "log.txt"), "a") as log:
            # SIGINT back to its default in the child: a driver started in the background (`... &`) inherits an
            # ignored SIGINT, and a script that ignores it could not be stopped to checkpoint.
            proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_default_sigint)  # fmt: skip
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak memory, not the driver's
            except KeyboardInterrupt:  # Ctrl-C reached the script too: it checkpoints, and a rerun resumes it
                proc.wait()
                raise
            except Terminated:  # `kill <driver>`: stop the script the same way (it checkpoints on SIGINT)
                proc.send_signal(signal.SIGINT)
                proc.wait()
                raise SystemExit(f"terminated; rerun the same command to resume {job.name}") from None
            finally:
                signal.signal(signal.SIGTERM, previous)
            proc.returncode = os.waitstatus_to_exitcode(status)
        meta.update(wall_clock_s=round(time.time() - start + earlier.get("wall_clock_s", 0), 1),
                    peak_rss_mb=round(max(usage.ru_maxrss / 1024, earlier.get("peak_rss_mb", 0)), 1),
                    returncode=proc.returncode, attempts=earlier.get("attempts", 1) + bool(resume))  # fmt: skip
        write_json(job_json, meta)
        if proc.returncode != 0:
            print(f"        FAILED (exit {proc.returncode}); see {show_path(job_dir)}/log.txt", flush=True)
            failed.append(job.name)
    return failed


def load_run(job_dir: str) -> Optional[dict]:
    """A finished job: its job.json, the script's summary.json and its evaluations (eval.jsonl), or None."""
    if not finished(job_dir):
        return None
    run_dir = run_dir_of(job_dir)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    evals = []
    if os.path.exists(os.path.join(run_dir, "eval.jsonl")):
        with open(os.path.join(run_dir, "eval.jsonl")) as f:
            evals = [json.loads(line) for line in f if line.strip()]
    meta = {}
    if os.path.exists(os.path.join(job_dir, "job.json")):
        with open(os.path.join(job_dir, "job.json")) as f:
            meta = json.load(f)
    return {"summary": summary, "evals": evals, "job": meta, "run_dir": run_dir}


def results_path(results_dir: str, entry: str, budget: str, kind: str = "") -> str:
    """results/<entry>.csv for the small budget (the README's numbers), <entry>_<budget>.csv for the others."""
    return os.path.join(results_dir, f"{entry}{'' if budget == 'small' else '_' + budget}{kind}.csv")


CURVE_METRICS = ("eval/return_mean", "eval/success_rate")


def save_results(jobs: list[Job], entry_dir: str, row_fn, path: str, curves: bool = False) -> list[dict]:
    """One row per finished job (its key, `row_fn(run)`, then the cost, command and commit it ran at) into `path`,
    and with `curves` every evaluation (long format, x-axis `step`) into <path>_curves.csv -> all rows of `path`.

    Rows already in the files for other runs (another --envs or --seeds selection, run earlier) are kept; a run
    collected again replaces its old row and curve."""
    rows, curve = [], []
    for job in jobs:
        run = load_run(os.path.join(entry_dir, job.name))
        if run is None:
            continue
        meta = run["job"]
        # an attempt stopped with its driver (Ctrl-C, a lost machine) left no job.json, but the script's own
        # clock, kept in its checkpoint, counts it: a resumed run's time is the larger of the two
        wall_clock = max(meta.get("wall_clock_s") or 0, run["summary"].get("wall_clock_s") or 0) or None
        rows.append({**job.key, **row_fn(run), "wall_clock_s": wall_clock,
                     "peak_rss_mb": meta.get("peak_rss_mb"), "command": meta.get("command"),
                     "commit": meta.get("commit")})  # fmt: skip
        curve += [{**job.key, "step": ev.get("global_step", ev.get("step")), **{m: ev.get(m) for m in CURVE_METRICS}}
                  for ev in run["evals"]]  # fmt: skip
    if not rows:
        return read_csv(path) if os.path.exists(path) else []
    keys = list(dict.fromkeys(k for job in jobs for k in job.key))
    collected = {_key(r, keys) for r in rows}
    rows = merge_rows(path, rows, keys, collected)
    write_csv(rows, path)
    if curves:
        curves_path = path[: -len(".csv")] + "_curves.csv"
        write_csv(merge_rows(curves_path, curve, keys, collected), curves_path)
    return rows


def _key(row: dict, keys: list[str]) -> tuple:
    # as text: a key read back from a CSV is parsed (1 -> int, "" -> None), so None and "" are the same empty cell
    return tuple("" if row.get(k) is None else str(row.get(k)) for k in keys)


def merge_rows(path: str, rows: list[dict], keys: list[str], replaced: set) -> list[dict]:
    """The rows of `path` whose key (the values of `keys`) is not in `replaced`, followed by `rows`."""
    old = read_csv(path) if os.path.exists(path) else []
    return [r for r in old if _key(r, keys) not in replaced] + rows


def first_step_reaching(evals: list[dict], metric: str, threshold: float) -> Optional[int]:
    for ev in evals:
        if ev.get(metric) is not None and ev[metric] >= threshold:
            return ev.get("global_step", ev.get("step"))
    return None


# ---- CSV and aggregation ---------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: str) -> None:
    """Atomically; the columns are the union of the rows' keys in first-seen order."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# Columns that are text even where they look like numbers: a commit "5105e26" would read as 5.105e+29 and "0123456"
# as 123456, and a merge would write the number back.
TEXT_COLUMNS = {"commit", "command"}


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (v if k in TEXT_COLUMNS and v else _parse(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(value: str):
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def mean_se(values: Iterable) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample std / sqrt(n); 0 for one value) and n, over the non-missing values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0, 1
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs)), len(xs)


def aggregate(rows: list[dict], by: list[str], metrics: list[str]) -> list[dict]:
    """Group rows by the `by` columns (first-seen order) -> one row per group with `<m>_mean`, `<m>_se`, `n`."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(c) for c in by), []).append(row)
    out = []
    for key, members in groups.items():
        agg = dict(zip(by, key))
        agg["n"] = len(members)
        for m in metrics:
            mean, se, _ = mean_se(r.get(m) for r in members)
            agg[f"{m}_mean"], agg[f"{m}_se"] = mean, se
        out.append(agg)
    return out


def fmt(mean: float, se: float, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(rows: list[dict], columns: list[str], headers: Optional[list[str]] = None) -> str:
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join("–" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
