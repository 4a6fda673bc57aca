"""Draw every result the benchmark entries wrote: results/<entry>.csv -> results/<entry>.png.

    python benchmarks/plot.py                       # every entry whose CSV exists (the small budget's files)
    python benchmarks/plot.py --suffix _paper       # the paper budget's files

Curves are the mean over seeds with a band of ± one standard error (no band where one seed ran); an env step (or
gradient step) enters a curve only where every seed of the group was evaluated there.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, aggregate, mean_se, read_csv, results_path, show_path  # noqa: E402


def mean_curves(rows: list[dict], group: list[str], x: str, y: str) -> dict:
    """{group values: (xs, means, standard errors)} over the seeds (rows) of each group, at the x every seed has."""
    by_group: dict[tuple, dict] = {}
    for r in rows:
        if r.get(y) is None:
            continue
        g = tuple(r[c] for c in group)
        by_group.setdefault(g, {}).setdefault(r[x], []).append(r[y])
    out = {}
    for g, points in by_group.items():
        n_seeds = max(len(v) for v in points.values())
        xs = sorted(k for k, v in points.items() if len(v) == n_seeds)
        stats = [mean_se(points[k]) for k in xs]
        out[g] = (xs, [m for m, _, _ in stats], [s for _, s, _ in stats])
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, xs, means, ses, label, color=None):
    line = ax.plot(xs, means, marker="o", markersize=3, label=label, color=color)[0]
    ax.fill_between(xs, [m - s for m, s in zip(means, ses)], [m + s for m, s in zip(means, ses)],
                    color=line.get_color(), alpha=0.2, linewidth=0)  # fmt: skip


def plot_curves(path: str, rows: list[dict], panel: str, group: list[str], x: str, y: str, xlabel: str, title: str):
    plt = _plt()
    panels = list(dict.fromkeys(r[panel] for r in rows))
    labels = list(dict.fromkeys(" ".join(str(r[k]) for k in group) for r in rows))  # a label's colour in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for g, (xs, means, ses) in mean_curves([r for r in rows if r[panel] == p], group, x, y).items():
            label = " ".join(str(v) for v in g)
            _band(ax, xs, means, ses, label, f"C{labels.index(label) % 10}")
        ax.set_title(f"{p}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(path: str, table: list[dict], group: str, bar: str, y: str, title: str, paper: dict = None):
    """Grouped bars of `<y>_mean` ± `<y>_se` (aggregate's columns); `paper[(group, bar)]` drawn as a black tick."""
    plt = _plt()
    groups = list(dict.fromkeys(t[group] for t in table))
    bars = list(dict.fromkeys(t[bar] for t in table))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(groups) * len(bars)), 3.8))
    for j, b in enumerate(bars):
        xs, means, ses = [], [], []
        for i, g in enumerate(groups):
            for t in table:
                if t[group] == g and t[bar] == b:
                    xs.append(i + (j - (len(bars) - 1) / 2) * width)
                    means.append(t[f"{y}_mean"])
                    ses.append(t[f"{y}_se"])
        ax.bar(xs, means, width, yerr=ses, label=str(b), capsize=2)
        for x, g in zip(xs, [g for g in groups if any(t[group] == g and t[bar] == b for t in table)]):
            if paper and paper.get((g, b)) is not None:
                ax.plot([x - width / 2, x + width / 2], [paper[(g, b)]] * 2, color="black", linewidth=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(y.replace("_", " ") + (" (black: paper)" if paper else ""))
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: str, rows: list[dict], quality: list[dict]):
    """Performance against the synthetic prior's quality Q, a panel per (part, env): online the final eval success,
    offline the final eval return, mean ± s.e. over seeds; a prior-free baseline as a dotted line with its band; an
    LLM's measured quality (prior_quality.csv: equivalent Q of the default `dist` prior) as a dashed vertical line."""
    plt = _plt()
    panels = list(dict.fromkeys((r["part"], r["env"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (part, env) in zip(axes[0], panels):
        y = "final_success" if part == "online" else "final_return"
        members = [r for r in rows if (r["part"], r["env"]) == (part, env) and r.get(y) is not None]
        baseline_styles = iter([":", "-.", (0, (1, 3))])
        for algo in dict.fromkeys(r["algo"] for r in members):
            mine = [r for r in members if r["algo"] == algo]
            qs = sorted({r["q"] for r in mine if r["q"] is not None})
            if qs:
                stats = [mean_se(r[y] for r in mine if r["q"] == q) for q in qs]
                _band(ax, qs, [m for m, _, _ in stats], [se for _, se, _ in stats], algo)
            else:
                m, se, _ = mean_se(r[y] for r in mine)
                ax.axhline(m, color="black", linestyle=next(baseline_styles), label=f"{algo} (no prior)")
                ax.axhspan(m - se, m + se, color="black", alpha=0.08, linewidth=0)
        marked = [0.0]
        for r in quality:
            env_of_panel = env if part == "online" else str(env).rsplit(":", 1)[0]  # offline: <env>:<transitions>
            if r["env"] == env_of_panel and r["mode"] == "dist" and r.get("label", "default") == "default":
                q = r.get("equivalent_q")
                if q is None and r.get("expert_prob") is not None:
                    q = (r["expert_prob"] - r["uniform_prob"]) / (1 - r["uniform_prob"])
                if q is not None:
                    marked.append(q)
                    ax.axvline(q, color="grey", linestyle="--", linewidth=1)
                    ax.text(q, ax.get_ylim()[1], f" {r['model']}", rotation=90, va="top", fontsize=6, color="grey")
        ax.set_title(f"{part}: {env}")
        ax.set_xlim(min(marked) - 0.05, 1.05)  # an LLM below uniform (Q < 0) stays in view
        ax.set_xlabel("synthetic prior quality Q")
        ax.set_ylabel(y.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Performance against prior quality (mean ± s.e. over seeds; dashed: an LLM's measured Q)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=RESULTS)
    parser.add_argument("--suffix", default="", help="'' (small budget), _paper or _smoke")
    args = parser.parse_args(argv)
    d, sfx, made = args.results_dir, args.suffix, []
    budget = sfx.lstrip("_") or "small"

    def csv_path(name: str, kind: str = "") -> str:
        return results_path(d, name, budget, kind)

    def have(name: str, kind: str = "") -> bool:
        return os.path.exists(csv_path(name, kind))

    def out(name: str) -> str:
        made.append(os.path.join(d, f"{name}{sfx}.png"))
        return made[-1]

    if have("fig3_online", "_curves"):
        rows = read_csv(csv_path("fig3_online", "_curves"))
        plot_curves(out("fig3_online"), rows, "env", ["algo"], "step", "eval/return_mean", "env steps",
                    "Fig. 3 on this machine: eval return (mean ± s.e. over seeds)")  # fmt: skip
    if have("fig4_ablations", "_curves"):
        rows = read_csv(csv_path("fig4_ablations", "_curves"))
        for r in rows:
            r["panel"] = f"{r['ablation']} ({r['env']})"
        plot_curves(out("fig4_ablations"), rows, "panel", ["value"], "step", "eval/return_mean", "env steps",
                    "Fig. 4b-d on this machine: k, KL coefficient (GFlan-Prior); softmax temperature, k, gradient "
                    "steps (DQN-Prior)")
    if have("table1_offline"):
        from table1_offline import paper_row

        table = aggregate(read_csv(csv_path("table1_offline")), ["dataset", "method"],
                          ["final_return"])  # fmt: skip
        paper = {(t["dataset"], m): v for t in table for m, v in paper_row(t["dataset"]).items()}
        plot_bars(out("table1_offline"), table, "dataset", "method", "final_return",
                  "Table 1 on this machine: final eval return (mean ± s.e. over seeds)", paper)  # fmt: skip
    if have("table2_generalisation"):
        rows = read_csv(csv_path("table2_generalisation"))
        long = [{**r, "split": split, "success": r[f"{split}_success"]} for r in rows for split in ("seen", "unseen")]
        for r in long:
            r["series"] = f"{r['eval_model']} {r['split']}"
        plot_curves(out("table2_generalisation"), [{**r, "panel": "ALFWorld-Pick"} for r in long], "panel",
                    ["series"], "eval_k", "success", "k at evaluation",
                    "Table 2 on this machine: one Q (trained with k=5) acting with other k and LLMs")  # fmt: skip
    if have("prior_quality"):
        rows = read_csv(csv_path("prior_quality"))
        drawn = ("default", "sum", "topk")  # the variants' other labels are in the CSV and docs/results.md
        rows = [r for r in rows if r.get("label") in (None, *drawn)]
        long = [{"env": r["env"], "series": " ".join(str(r[c]) for c in ("model", "mode", "label") if r.get(c)),
                 "k": int(c.split("@")[1]), "coverage": v}
                for r in rows for c, v in r.items()
                if c.startswith("coverage@") and c.split("@")[1].isdigit()]  # not coverage@5_by_verb  # fmt: skip
        plot_curves(out("prior_quality"), long, "env", ["series"], "k", "coverage", "k proposals",
                    "Prior quality: share of expert states whose expert action is among k proposals (labels default, "
                    "sum, topk)")  # fmt: skip
    if have("prior_sweep"):
        quality = read_csv(csv_path("prior_quality")) if have("prior_quality") else []
        plot_sweep(out("prior_sweep"), read_csv(csv_path("prior_sweep")), quality)
    for path in made:
        print(f"wrote {show_path(path)}")
    if not made:
        print(f"no results under {d} with suffix {sfx!r}; run a benchmark entry first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
