"""A run: its folder and logs, checkpoints and resuming, interrupts, progress lines and one-line errors.

Everything a run writes lives in `runs/<run_name>/` (run_name = `<env>__<exp_name>__<seed>__<unix time>`):
`args.json`, TensorBoard events (wandb mirrors them with `--track`), `eval.jsonl` (one line per evaluation),
`checkpoint.pt` and, at the end, `summary.json` and the trained network.

Checkpoints are taken at clean boundaries only (after an evaluation, and where a run stops), written to a temporary
file and renamed. SIGINT or SIGTERM asks the run to stop at its next clean boundary (the rest of the current step,
or at once during an evaluation, which the resumed run repeats); it saves a checkpoint there and exits. A second
Ctrl-C stops at once; the last checkpoint stays. `--resume <run folder>/checkpoint.pt` continues in the folder that
holds the checkpoint, exactly where it stopped: same numbers, same logs. Only one process runs a folder at a time
(a lock file).

Failures a user can fix (bad arguments, a missing or malformed file, an unreachable LLM server) end in one line on
stderr without a traceback; LLMPRIOR_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import os
import re
import signal
import sys
import time
import typing
from typing import Callable, Optional  # noqa: F401

DEBUG = os.environ.get("LLMPRIOR_DEBUG", "") not in ("", "0")


class UserError(Exception):
    """A failure the user can fix: reported in one line, without a traceback."""


class Interrupted(Exception):
    """Raised inside a long evaluation when a stop was asked for: the evaluation is dropped, and repeated on resume."""


class Stopped(Exception):
    """The run stopped at a clean point on request and saved a checkpoint; the message says how to go on."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_args(**conditions: tuple[bool, str]) -> None:
    """check_args(k=(args.k >= 0, ">= 0"), ...): one line naming the first bad flag and its value."""
    for name, (ok, rule) in conditions.items():
        check(ok, f"--{name.replace('_', '-')} must be {rule}")


def cli(args_class, train: Callable) -> None:
    """`if __name__ == "__main__": cli(Args, train)`: parse the command line, run, and report a known failure in one
    line (exit status 2; 130 for a stop by Ctrl-C)."""
    import tyro

    args = tyro.cli(args_class)
    try:
        train(args)
    except UserError as err:
        if DEBUG:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if DEBUG:
            raise
        print("stopped at once; the last checkpoint stays", file=sys.stderr)
        sys.exit(130)


# ---- interrupts ------------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGINT and SIGTERM set `requested`; the run checks it at its clean boundaries. A second SIGINT raises
    KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping at the next clean point to save a checkpoint (Ctrl-C again to stop now; "
              "the last checkpoint stays)", file=sys.stderr, flush=True)  # fmt: skip

    def check(self) -> None:
        """For long evaluations: raise Interrupted if a stop was asked for."""
        if self.requested:
            raise Interrupted(self.requested)


# ---- arguments -------------------------------------------------------------------------------------------------------
def flat_fields(obj, prefix: str = "") -> dict:
    """A (nested) dataclass as {"prior.mode": value, ...}."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def from_dict(cls, values: dict):
    """A (nested) dataclass from its `dataclasses.asdict`; fields the dict lacks keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            value = from_dict(hints[f.name], value)
        kwargs[f.name] = value
    return cls(**kwargs)


def resume_args(cli_args, saved, overrides: tuple[str, ...], argv: Optional[list[str]] = None):
    """The arguments of a resumed run: the checkpoint's (`saved`), except the `overrides` (its length, how it computes)
    given on the command line. Another flag given there that differs from the checkpoint is ignored, with a warning:
    a resumed run keeps its algorithm's settings. A flag counts as given when named, even at its default value."""
    argv = sys.argv[1:] if argv is None else argv
    named = {a.split("=")[0] for a in argv if a.startswith("--")}
    given, old = flat_fields(cli_args), flat_fields(saved)
    for key, value in given.items():
        prefix, _, name = key.rpartition(".")
        negated = f"{prefix}.no-{name}" if prefix else f"no-{name}"  # tyro's --no-flag / --prior.no-flag
        flags = {f"--{key}", f"--{key.replace('_', '-')}", f"--{negated.replace('_', '-')}"}
        if key == "resume" or key not in old or value == old[key] or not flags & named:
            continue
        flag = "--" + key.replace("_", "-")
        if key in overrides:
            target = saved
            for part in prefix.split(".") if prefix else []:
                target = getattr(target, part)
            setattr(target, name, value)
            print(f"resuming with {flag} {value} (the checkpoint had {old[key]})")
        else:
            print(f"warning: {flag} {value} ignored: the resumed run keeps the checkpoint's {old[key]}",
                  file=sys.stderr)
    saved.resume = cli_args.resume
    return saved


# ---- the run ---------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> dict:
    import torch

    check(os.path.isfile(path), f"--resume {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a cut or foreign file: one line, not torch's traceback
        raise UserError(f"--resume {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


class Run:
    """The folder of one run and everything written into it. Created by `open()` once the run has started without
    error, so that a failed start leaves no folder behind."""

    def __init__(self, args, folder: str, resumed: Optional[dict] = None) -> None:
        self.args, self.folder, self.name = args, folder, os.path.basename(folder)
        self.elapsed_before = resumed["elapsed_s"] if resumed else 0.0
        self.last_eval = resumed["last_eval"] if resumed else None
        self.session_start = time.time()
        self.writer = None
        self._lock = None

    @property
    def elapsed(self) -> float:
        """Seconds the run has taken, over every session that worked on it."""
        return self.elapsed_before + time.time() - self.session_start

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def open(self, config: dict) -> "Run":
        os.makedirs(self.folder, exist_ok=True)
        self._lock = open(self.path(".lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.folder} is being run by another process; wait for it or stop it first") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        for stale in glob.glob(self.path("*.tmp-*")):  # a checkpoint half-written when a process was killed
            os.remove(stale)
        if self.last_eval is not None:
            self._keep_evals_up_to(self.last_eval)
        with open(self.path("args.json"), "w") as f:
            json.dump(config, f, indent=2)
        from torch.utils.tensorboard import SummaryWriter

        if self.args.track:
            import wandb

            # project and entity: $WANDB_PROJECT, $WANDB_ENTITY (wandb's own variables)
            wandb.init(project=os.environ.get("WANDB_PROJECT", "llm-prior-rl"), sync_tensorboard=True, config=config,
                       name=self.name, save_code=True)  # fmt: skip
        self.writer = SummaryWriter(self.folder)
        if self.last_eval is None:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in flat_fields(self.args).items()))  # fmt: skip
        return self

    def _keep_evals_up_to(self, step: int) -> None:
        """eval.jsonl as of the checkpoint: an evaluation logged after it is repeated by the resumed run."""
        path = self.path("eval.jsonl")
        if os.path.exists(path):
            lines = [line for line in open(path) if line.strip() and json.loads(line)["global_step"] <= step]
            with open(path, "w") as f:
                f.writelines(lines)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def log_eval(self, step: int, result: dict) -> None:
        self.log(result, step)
        with open(self.path("eval.jsonl"), "a") as f:
            f.write(json.dumps({"global_step": step, **result}) + "\n")
        self.last_eval = step

    def save_checkpoint(self, state: dict) -> str:
        """Atomic: a crash mid-write leaves the previous checkpoint."""
        import torch

        path = self.path("checkpoint.pt")
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({**state, "args": dataclasses.asdict(self.args), "elapsed_s": self.elapsed,
                    "last_eval": self.last_eval}, tmp)  # fmt: skip
        os.replace(tmp, path)
        return path

    def finish(self, summary: dict) -> dict:
        summary = {"run_name": self.name, **summary, "wall_clock_s": round(self.elapsed, 1)}
        with open(self.path("summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("summary " + json.dumps(summary), flush=True)
        self.close()
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.args.track:
            import wandb

            wandb.finish()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def load_resume(args, args_class, overrides: tuple[str, ...]) -> tuple:
    """-> (args, checkpoint): with --resume, the checkpoint and its run's arguments (see resume_args); else (args,
    None)."""
    if not args.resume:
        return args, None
    ckpt = read_checkpoint(args.resume)
    return resume_args(args, from_dict(args_class, ckpt["args"]), overrides), ckpt


def file_name(text: str) -> str:
    """`text` as one file name: each run of characters other than letters, digits, `_`, `.` and `-` becomes `-` (an env
    spec's `:`, `/`, `,` and `=`: `mymodule:MyEnv,size=4` -> `mymodule-MyEnv-size-4`)."""
    return re.sub(r"[^\w.-]+", "-", text).strip("-")


def new_run(args, ckpt: Optional[dict], env: str) -> Run:
    """A new run in `<runs_dir>/<env>__<exp_name>__<seed>__<unix time>` (the --env spec as a file name), or the resumed
    one in the folder that holds its checkpoint. Its folder is created by Run.open()."""
    if ckpt is None:
        name = f"{file_name(env)}__{args.exp_name}__{args.seed}__{int(time.time())}"
        return Run(args, os.path.join(args.runs_dir, name))
    return Run(args, os.path.dirname(os.path.abspath(args.resume)), ckpt)


# ---- progress --------------------------------------------------------------------------------------------------------
class Progress:
    """Progress lines: at most every `every` seconds and when asked, with a rate that means something at any speed
    and the time left."""

    def __init__(self, total: int, unit: str, done: int = 0, every: float = 30.0, first_line_now: bool = True) -> None:
        self.total, self.unit, self.every = total, unit, every
        self.start_done, self.start = done, time.time()
        self.last = 0.0 if first_line_now else self.start

    def due(self) -> bool:
        return time.time() - self.last >= self.every

    def rate(self, done: int) -> str:
        seconds, n = time.time() - self.start, done - self.start_done
        if n <= 0 or seconds <= 0:
            return f"0 {self.unit}s/s"
        per_second = n / seconds
        left = (self.total - done) / per_second
        speed = f"{per_second:.2f} {self.unit}s/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{self.unit}"
        return f"{speed}, {_duration(left)} left"

    def line(self, done: int, text: str) -> None:
        self.last = time.time()
        print(f"{self.unit} {done}/{self.total} {text} | {self.rate(done)}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def rng_state(rng) -> dict:
    import random

    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "generator": rng.bit_generator.state}  # fmt: skip


def set_rng_state(state: dict, rng) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["generator"]


def seed_everything(seed: int):
    """random, numpy, torch and a numpy Generator for the run (returned)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    return np.random.default_rng(seed)
