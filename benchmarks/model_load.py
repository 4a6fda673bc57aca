"""The cost of loading an embedded LLM: the first load on a fresh machine, and every later one.

Each load runs in its own process, with HOME and $LLMPRIOR_CACHE in a new temporary folder (so the first load also
assembles the gemma package's GGUF from its parts, as on a fresh machine), and times `llmprior.models.load_model`
alone (the Python imports of torch and transformers, which every script pays anyway, are reported apart). Reported:
seconds, MB written under HOME (the assembled GGUF, the converted folder), peak RSS of the process.

- `first`: empty HOME and cache: assemble, read config and tokenizer into the cache, dequantise the weights;
- `later`: the same folders again: tokenizer from the cache, the weights dequantised from the GGUF;
- `legacy` (with --legacy): what earlier versions did on a first load, transformers' own GGUF conversion saved as a
  float32 folder (`llmprior.models._convert_gguf`).

    OMP_NUM_THREADS=1 python benchmarks/model_load.py                       # gemma and smollm2
    OMP_NUM_THREADS=1 python benchmarks/model_load.py --models gemma --legacy

Writes results/model_load.csv (a row per model, phase and thread count; rows of other selections are kept).
"""

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import _key, common_parser, git_commit, markdown_table, merge_rows, write_csv  # noqa: E402

ENTRY = "model_load"
KEY = ["model", "phase", "threads"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: times the imports and the load apart, reports JSON on its last line.
CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
import torch, transformers
from llmprior import models
imported = time.perf_counter()
name, phase = sys.argv[1], sys.argv[2]
if phase == "legacy":
    source = models._gguf_source(name)
    models._convert_gguf(*source)
else:
    models.load_model(name, torch.device("cpu"), torch.float32)
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": done - imported, "threads": torch.get_num_threads(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def folder_mb(path: str) -> float:
    paths = [os.path.join(folder, f) for folder, _, files in os.walk(path) for f in files]
    return sum(os.path.getsize(p) for p in paths if not os.path.islink(p)) / 2**20


def load_once(model: str, phase: str, home: str) -> dict:
    env = dict(os.environ, HOME=home, LLMPRIOR_CACHE=os.path.join(home, ".cache", "llmprior"), PYTHONPATH=ROOT)
    before = folder_mb(home)
    out = subprocess.run([sys.executable, "-c", CHILD, model, "legacy" if phase == "legacy" else "load"], env=env,
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{model} {phase}: {out.stderr.strip().splitlines()[-1]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["written_mb"] = folder_mb(home) - before
    return result


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["gemma", "smollm2"])
    parser.add_argument("--legacy", action="store_true", help="also time the earlier first load (float32 folder)")
    args = parser.parse_args(argv)
    phases = ["first", "later"] + (["legacy"] if args.legacy else [])
    if args.dry_run:
        print(f"would load {args.models}: {phases}")
        return 0
    commit, rows = git_commit(), []
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    command = f"OMP_NUM_THREADS={threads} python benchmarks/model_load.py " + " ".join(argv if argv is not None
                                                                                     else sys.argv[1:])
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="model_load_") as home, \
                tempfile.TemporaryDirectory(prefix="model_load_legacy_") as legacy_home:  # fmt: skip
            for phase in phases:
                result = load_once(model, phase, legacy_home if phase == "legacy" else home)
                rows.append({"model": model, "phase": phase, "threads": result["threads"],
                             "load_s": round(result["load_s"], 1), "import_s": round(result["import_s"], 1),
                             "written_mb": round(result["written_mb"], 2), "peak_rss_mb": round(result["peak_rss_mb"]),
                             "commit": commit, "command": command})  # fmt: skip
                print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    path = os.path.join(args.results_dir, f"{ENTRY}.csv")
    rows = merge_rows(path, rows, KEY, {_key(r, KEY) for r in rows})
    write_csv(rows, path)
    print(markdown_table(rows, ["model", "phase", "threads", "load_s", "import_s", "written_mb", "peak_rss_mb"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
