"""The reproduction suite: aggregation and table layout on synthetic CSVs, and every entry's `--budget smoke` end to
end (a tiny random LM as prior and policy, so that CI stays short; the embedded models are the other tests' job)."""

import csv
import glob
import json
import math
import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402
import fig3_online  # noqa: E402
import fig4_ablations  # noqa: E402
import main_command  # noqa: E402
import plot  # noqa: E402
import prior_quality  # noqa: E402
import prior_speed  # noqa: E402
import prior_sweep  # noqa: E402
import table1_offline  # noqa: E402
import table2_generalisation  # noqa: E402
import table12_cache  # noqa: E402

CORPUS = [
    "pick up the tomato take the bowl walk to the cutting board serve nothing chop nothing go left go right go up",
    "Observation: There is a fixed cutting board in the room. You notice a tomato on the table. Action:",
    "put the lettuce in the bowl chop the onion walk to the counter serve the dish go down",
]


# ---- aggregation ------------------------------------------------------------------------------------------------------
def test_mean_se_and_aggregate_by_group():
    mean, se, n = common.mean_se([1.0, 2.0, 3.0, None])
    assert (mean, n) == (2.0, 3) and se == pytest.approx(math.sqrt(1.0 / 3))  # sample std 1, / sqrt(3)
    assert common.mean_se([5.0]) == (5.0, 0.0, 1)
    assert math.isnan(common.mean_se([None])[0])
    rows = [{"env": "a", "algo": "x", "seed": s, "ret": r} for s, r in [(1, 1.0), (2, 3.0)]]
    rows += [{"env": "a", "algo": "y", "seed": 1, "ret": -1.0}, {"env": "b", "algo": "x", "seed": 1, "ret": None}]
    table = common.aggregate(rows, ["env", "algo"], ["ret"])
    assert [(t["env"], t["algo"], t["n"]) for t in table] == [("a", "x", 2), ("a", "y", 1), ("b", "x", 1)]
    assert table[0]["ret_mean"] == 2.0 and table[0]["ret_se"] == pytest.approx(1.0)  # std sqrt(2) / sqrt(2)
    assert table[1]["ret_se"] == 0.0 and math.isnan(table[2]["ret_mean"])
    assert common.fmt(2.0, 1.0) == "2.00 ± 1.00" and common.fmt(float("nan"), 0.0) == "–"


def test_csv_round_trip_and_markdown_layout(tmp_path):
    rows = [{"env": "a", "seed": 1, "ret": 0.5, "hit": None, "ok": True}, {"env": "b", "seed": 2, "ret": -1, "extra": "z"}]
    path = str(tmp_path / "r.csv")
    common.write_csv(rows, path)
    assert open(path).readline().strip() == "env,seed,ret,hit,ok,extra"  # union of columns, first-seen order
    back = common.read_csv(path)
    assert back[0] == {"env": "a", "seed": 1, "ret": 0.5, "hit": None, "ok": True, "extra": None}
    assert back[1]["ret"] == -1 and isinstance(back[1]["ret"], int)
    # a commit that looks like a number stays the commit through a read and a merge
    common.write_csv([{"env": "a", "commit": "5105e26"}, {"env": "b", "commit": "0123456"}], path)
    merged = common.merge_rows(path, [], ["env"], set())
    common.write_csv(merged, path)
    assert [r["commit"] for r in common.read_csv(path)] == ["5105e26", "0123456"]
    # a row keyed by an empty cell is replaced by a new row with the same empty key ("" written, None read back)
    common.write_csv([{"part": "a", "server": "", "wall": 1}, {"part": "a", "server": "x", "wall": 2}], path)
    new = [{"part": "a", "server": "", "wall": 3}]
    merged = common.merge_rows(path, new, ["part", "server"], {common._key(r, ["part", "server"]) for r in new})
    assert [r["wall"] for r in merged] == [2, 3]
    common.write_csv(rows, path)
    back = common.read_csv(path)
    assert not glob.glob(str(tmp_path / "*.tmp*"))  # atomic write leaves no temp file
    table = common.markdown_table(back, ["env", "ret", "hit"], ["Env", "Return", "Hit"])
    assert table.splitlines() == ["| Env | Return | Hit |", "|---|---|---|", "| a | 0.5 | – |", "| b | -1 | – |"]


def finish_fake_run(entry_dir, job, ret):
    """A job folder as a finished script run leaves it: <job>/<run>/summary.json and eval.jsonl."""
    run_dir = os.path.join(entry_dir, job.name, "run")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"ret": ret}, f)
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        f.write(json.dumps({"global_step": 10, "eval/return_mean": ret}) + "\n")


def test_collecting_a_selection_keeps_the_rows_of_the_other_runs(tmp_path):
    """`--envs b` after a full run replaces b's rows and curves and keeps a's (it used to drop them)."""
    jobs = {(env, seed): common.Job({"env": env, "seed": seed}, "dqn_prior.py") for env in "ab" for seed in (1, 2)}
    for (env, seed), job in jobs.items():
        finish_fake_run(str(tmp_path / "runs"), job, seed)
    path, row_fn = str(tmp_path / "r.csv"), lambda run: {"ret": run["summary"]["ret"]}
    common.save_results(list(jobs.values()), str(tmp_path / "runs"), row_fn, path, curves=True)
    selection = [jobs["b", 1], jobs["b", 2]]
    for job in selection:
        finish_fake_run(str(tmp_path / "runs"), job, 10 * job.key["seed"])
    rows = common.save_results(selection, str(tmp_path / "runs"), row_fn, path, curves=True)
    expected = [("a", 1, 1), ("a", 2, 2), ("b", 1, 10), ("b", 2, 20)]
    assert [(r["env"], r["seed"], r["ret"]) for r in rows] == expected
    assert [(r["env"], r["seed"], r["ret"]) for r in common.read_csv(path)] == expected
    curves = common.read_csv(str(tmp_path / "r_curves.csv"))
    curve_rows = [(r["env"], r["seed"], r["step"], r["eval/return_mean"]) for r in curves]
    assert curve_rows == [(env, seed, 10, ret) for env, seed, ret in expected]
    # a selection with no finished run changes nothing
    assert common.save_results([common.Job({"env": "c", "seed": 1}, "x.py")], str(tmp_path / "runs"), row_fn, path) == rows


def test_mean_curves_use_steps_every_seed_reached():
    rows = [{"algo": "x", "seed": 1, "step": s, "r": float(s)} for s in (100, 200, 300)]
    rows += [{"algo": "x", "seed": 2, "step": s, "r": float(s) + 2} for s in (100, 200)]  # seed 2 stopped earlier
    rows += [{"algo": "y", "seed": 1, "step": 100, "r": None}]
    curves = plot.mean_curves(rows, ["algo"], "step", "r")
    xs, means, ses = curves[("x",)]
    assert xs == [100, 200] and means == [101.0, 201.0] and ses == pytest.approx([1.0, 1.0])
    assert ("y",) not in curves  # no value at all


def test_plot_writes_pngs_from_synthetic_csvs(tmp_path):
    d = str(tmp_path)
    common.write_csv([{"env": "e", "algo": a, "seed": s, "step": st, "eval/return_mean": st / 100 + s,
                       "eval/success_rate": 0.0} for a in ("dqn", "dqn_prior") for s in (1, 2) for st in (10, 20)],
                     os.path.join(d, "fig3_online_curves.csv"))  # fmt: skip
    common.write_csv([{"dataset": "overcooked-salad:1000", "method": m, "seed": s, "final_return": 0.1 * s}
                      for m in ("CQL", "CQL-Prior") for s in (1, 2)], os.path.join(d, "table1_offline.csv"))  # fmt: skip
    common.write_csv([{"env": "e", "model": "embedded", "mode": "dist", "coverage@1": 0.2, "coverage@5": 0.6,
                       "coverage@5_by_verb": '{"go": [3, 0.5]}', "expert_prob": 0.3, "uniform_prob": 0.2}],
                     os.path.join(d, "prior_quality.csv"))  # fmt: skip
    common.write_csv([{"part": p, "env": "e", "algo": a, "q": q, "seed": s, "final_success": 0.5, "final_return": 1.0}
                      for p in ("online", "offline") for a, q in (("DQN-Prior", 0.0), ("DQN-Prior", 1.0), ("DQN", None))
                      for s in (1, 2)], os.path.join(d, "prior_sweep.csv"))  # fmt: skip
    assert plot.main(["--results-dir", d]) == 0
    for name in ("fig3_online", "table1_offline", "prior_quality", "prior_sweep"):
        assert open(os.path.join(d, f"{name}.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot.main(["--results-dir", str(tmp_path / "empty")]) == 1


def test_extra_arguments_reach_only_the_scripts_that_take_them():
    extra = ["--prior.model", "m", "--policy.model", "p", "--encoder", "e", "--k", "3", "--kl-coef", "0.1"]
    assert common.drop_args(extra, common.NOT_TAKEN["bc.py"]) == ["--policy.model", "p", "--kl-coef", "0.1"]
    assert common.drop_args(extra, common.NOT_TAKEN["dqn_prior.py"]) == [
        "--prior.model", "m", "--encoder", "e", "--k", "3", "--kl-coef", "0.1"]  # fmt: skip
    assert common.prior_args(extra) == ["--prior.model", "m"]
    # a dataset built with another prior gets its own file
    assert table1_offline.dataset_path("d", "overcooked-salad:1000", []) == os.path.join("d", "overcooked-salad_1000.jsonl")
    assert table1_offline.dataset_path("d", "overcooked-salad:1000", extra) != table1_offline.dataset_path(
        "d", "overcooked-salad:1000", [])  # fmt: skip


def test_smallest_dataset_reaching_a_return():
    table = [{"dataset": f"overcooked-salad:{n}", "method": m, "final_return_mean": r}
             for n, m, r in [(1000, "CQL", 0.3), (4000, "CQL", 1.2), (24000, "CQL", 1.3), (1000, "CQL-Prior", 1.0),
                             (4000, "CQL-Prior", 0.9)]]  # fmt: skip
    assert table1_offline.smallest_reaching(table, "final_return", 1.0) == {"CQL": 4000, "CQL-Prior": 1000}


def test_every_entry_has_three_budgets_and_a_dry_run(capsys):
    for entry in (fig3_online, fig4_ablations, table1_offline, table2_generalisation, table12_cache, prior_quality,
                  prior_speed, prior_sweep):
        assert set(entry.BUDGET) == set(common.BUDGETS), entry.__name__
        for budget in common.BUDGETS:
            assert entry.main(["--budget", budget, "--dry-run", "--runs-dir", "/nonexistent/runs",
                               "--results-dir", "/nonexistent/results"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "python dqn_prior.py --env overcooked-tomato" in printed and "--total-steps 0 --load-model" in printed
    assert not os.path.exists("/nonexistent")


def test_any_env_spec_runs_online_and_names_its_folders():
    """An env no budget names (from elsewhere, or with keywords) runs online with the budget's `online_other`; an
    offline dataset's env does not; specs and `<env>:<transitions>` with a `:` in the env make file names."""
    jobs = prior_sweep.online_jobs(prior_sweep.BUDGET["small"], ["mymod:Env,size=4", "overcooked-salad",
                                                                  "textworld-treasure"], [1.0], [1])  # fmt: skip
    settings = {j.key["env"]: j.args[j.args.index("--eval-freq") + 1] for j in jobs}
    assert settings == {"mymod:Env,size=4": 100, "textworld-treasure": 250}
    assert {j.name for j in jobs if j.key["algo"] == "DQN"} == {"online__mymod-Env-size-4__DQN__None__1",
                                                                 "online__textworld-treasure__DQN__None__1"}
    assert common.dataset_spec("mymod:Env,size=4:1000") == ("mymod:Env,size=4", 1000)
    assert os.path.basename(table1_offline.dataset_path("d", "mymod:Env:40", [])) == "mymod-Env_40.jsonl"
    assert common.name_part("CQL (mean TD)") == "CQL(meanTD)"  # the job folders of earlier runs keep their names
    fig3 = fig3_online.jobs_for("small", ["textworld-treasure"], ["dqn_prior"], [1])[0].args  # on the sweep's axis
    assert [fig3[fig3.index(f) + 1] for f in ("--total-timesteps", "--eval-freq", "--eval-episodes")] == [3000, 250, 10]


def test_fig3_small_budget_evaluates_like_the_prior_sweep_and_fig4_takes_a_subset_of_values():
    args = {job.key["env"]: job.args for job in fig3_online.jobs_for("small")}
    assert set(args) == {"overcooked-tomato", "frozenlake", "alfworld-pick"}

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    sweep = prior_sweep.BUDGET["small"]["online"]
    for env in ("overcooked-tomato", "alfworld-pick"):  # the same runs as the sweep's DQN / DQN-Prior axis
        assert (flag(args[env], "--total-timesteps"), flag(args[env], "--eval-freq"),
                flag(args[env], "--eval-episodes")) == (sweep[env]["steps"], sweep[env]["eval_freq"],
                                                        sweep[env]["eval_episodes"])  # fmt: skip
    assert (flag(args["frozenlake"], "--eval-freq"), flag(args["frozenlake"], "--eval-episodes")) == (100, 10)
    jobs = fig4_ablations.jobs_for("small", ["kl"], values=[1, 0])
    assert [(j.key["value"], flag(j.args, "--k")) for j in jobs] == [(1, "5"), (0, "0")]  # 0 is GFlan: no prior
    with pytest.raises(SystemExit):
        fig4_ablations.main(["--values", "1", "--dry-run"])  # --values with every ablation: which one?


# ---- each entry's smoke budget, end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tiny_model, tmp_path_factory):
    """Common arguments: a runs/results/data folder per test module and the tiny LM as prior and policy."""
    lm = tiny_model("llama", CORPUS, name="bench-llama")
    base = tmp_path_factory.mktemp("bench")
    dirs = ["--runs-dir", str(base / "runs"), "--results-dir", str(base / "results")]
    models = ["--", "--prior.model", lm, "--prior.cache", str(base / "cache.sqlite"), "--policy.model", lm]
    return {"base": base, "dirs": dirs, "models": models, "lm": lm}


def read_rows(smoke, name):
    with open(smoke["base"] / "results" / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_fig3_online_runs_resumes_and_records_commands(smoke):
    argv = ["--budget", "smoke", *smoke["dirs"], *smoke["models"]]
    assert fig3_online.main(argv) == 0
    rows = read_rows(smoke, "fig3_online_smoke")
    assert [(r["algo"], r["steps"]) for r in rows] == [("dqn", "24"), ("dqn_prior", "24"), ("gflan_prior", "24")]
    assert all(r["command"].startswith("python ") and r["commit"] for r in rows)
    # the prior's flags reach the runs with a prior, not DQN (--k 0), which refuses them
    assert ["--prior.model" in r["command"] for r in rows] == [False, True, True]
    assert float(rows[0]["peak_rss_mb"]) > 0
    assert "--policy.model" not in rows[0]["command"]  # dqn_prior.py has no LM policy
    curves = read_rows(smoke, "fig3_online_smoke_curves")
    assert {(c["algo"], c["step"]) for c in curves} == {("dqn", "24"), ("dqn_prior", "24"), ("gflan_prior", "24")}
    # a second invocation finds every run finished and runs nothing
    job = json.load(open(glob.glob(str(smoke["base"] / "runs" / "fig3_online" / "smoke" / "*dqn__1" / "job.json"))[0]))
    assert fig3_online.main(argv) == 0
    assert json.load(open(glob.glob(str(smoke["base"] / "runs" / "fig3_online" / "smoke" / "*dqn__1" / "job.json"))[0])) == job


def test_smoke_table1_and_table2_share_the_dataset(smoke):
    argv = ["--budget", "smoke", *smoke["dirs"], "--data-dir", str(smoke["base"] / "data")]
    assert table1_offline.main([*argv, *smoke["models"]]) == 0
    rows = read_rows(smoke, "table1_offline_smoke")
    assert [r["method"] for r in rows] == ["DQN", "CQL", "CQL (mean TD)", "DQN-Prior", "CQL-Prior", "BC"]
    assert all(r["final_return"] != "" for r in rows)
    assert float(rows[4]["data_action_in_proposals"]) <= 1.0 and rows[1]["data_action_in_proposals"] == "1.0"
    datasets = glob.glob(str(smoke["base"] / "data" / "*.jsonl"))
    assert len(datasets) == 1  # built once, with the tiny prior's proposals stored
    assert json.loads(open(datasets[0]).readline())["prior"].startswith("transformers:")
    assert table2_generalisation.main([*argv, *smoke["models"]]) == 0
    assert len(glob.glob(str(smoke["base"] / "data" / "*.jsonl"))) == 1  # reused, not rebuilt
    rows = read_rows(smoke, "table2_generalisation_smoke")
    assert [(r["eval_model"], r["eval_k"]) for r in rows] == [("embedded", "1"), ("embedded", "2")]
    assert all(r["seen_return"] != "" and r["unseen_return"] == "" for r in rows)  # Salad has no unseen split
    assert all("--load-model" in r["command"] and "--total-steps 0" in r["command"] for r in rows)


def test_smoke_table12_and_fig4(smoke):
    assert table12_cache.main(["--budget", "smoke", *smoke["dirs"], "--", "--prior.model", smoke["lm"]]) == 0
    rows = {r["variant"]: r for r in read_rows(smoke, "table12_cache_smoke")}
    assert set(rows) == {"per-step", "memory", "disk", "warm"}
    # the cached variants: the same proposals, so the same learning; only the cost differs
    assert len({rows[v]["final_return"] for v in ("memory", "disk", "warm")}) == 1
    # per-step asks the LLM at every step and draws fresh proposals each time
    assert int(rows["per-step"]["prior_queries"]) >= int(rows["memory"]["prior_queries"]) > 0
    assert "--prior.per-visit" in rows["per-step"]["command"] and "--prior.per-visit" not in rows["memory"]["command"]
    assert int(rows["warm"]["prior_queries"]) == 0 and float(rows["warm"]["prior_cache_hit_rate"]) == 1.0
    assert fig4_ablations.main(["--budget", "smoke", *smoke["dirs"], *smoke["models"]]) == 0
    rows = read_rows(smoke, "fig4_ablations_smoke")
    assert [(r["ablation"], r["value"]) for r in rows] == [("k", "1"), ("kl", "0"), ("kl", "0.001"), ("alpha", "0"),
                                                           ("dqn_k", "1"), ("gradient_steps", "5")]  # fmt: skip


def test_smoke_prior_quality(smoke):
    """Coverage@k, the expert's probability and its equivalent Q, read from build_dataset.py's expert datasets; a
    labelled variant adds its rows."""
    argv = ["--budget", "smoke", *smoke["dirs"], "--models", smoke["lm"], "--modes", "dist", "map", "--ks", "1", "5"]
    assert prior_quality.main(argv) == 0
    rows = read_rows(smoke, "prior_quality_smoke")
    assert [(r["env"], r["mode"]) for r in rows] == [("overcooked-tomato", "dist"), ("overcooked-tomato", "map")]
    for r in rows:
        assert 0.0 <= float(r["coverage@1"]) <= float(r["coverage@5"]) <= 1.0 and int(r["states"]) >= 5
        assert r["command"].startswith("python build_dataset.py") and "--mix.expert 0.5" in r["command"]
    p, u, q = float(rows[0]["expert_prob"]), float(rows[0]["uniform_prob"]), float(rows[0]["equivalent_q"])
    assert 0 < p < 1 and u == 0.2 and q == pytest.approx((p - u) / (1 - u), abs=2e-3)
    assert rows[1]["expert_prob"] == "" and rows[1]["expert_rank"] == ""
    by_verb = [(float(c), int(n)) for part in rows[0]["coverage@5_by_verb"].split()
               for c, n in [part.rsplit(":", 1)[1].split("/")]]  # fmt: skip
    assert sum(n for _, n in by_verb) == int(rows[0]["states"])  # every state has an expert action on Tomato
    assert sum(c * n for c, n in by_verb) / int(rows[0]["states"]) == pytest.approx(float(rows[0]["coverage@5"]),
                                                                                    abs=0.01)  # fmt: skip
    assert prior_quality.main([*argv[:-6], "--models", smoke["lm"], "--label", "mixed", "--", "--prior.uniform-mix",
                               "1"]) == 0  # fmt: skip
    rows = read_rows(smoke, "prior_quality_smoke")
    assert [r["label"] for r in rows] == ["default", "default", "mixed"]
    assert float(rows[2]["equivalent_q"]) == pytest.approx(0.0, abs=1e-9)  # all uniform


def test_smoke_prior_speed(smoke):
    """Seconds per state of the tree scoring (with and without reusing an earlier state's prompt prefix) next to the
    floor and the padded reference, whose scores it matches."""
    assert prior_speed.main(["--budget", "smoke", *smoke["dirs"], "--models", smoke["lm"], "--modes", "dist",
                             "map"]) == 0  # fmt: skip
    (row,) = read_rows(smoke, "prior_speed_smoke")
    assert row["env"] == "overcooked-tomato" and row["backend"] == "transformers" and int(row["states"]) == 3
    assert float(row["actions_per_state"]) == 5
    assert all(float(row[c]) > 0 for c in ("floor_s", "floor_head_s", "dist_s", "dist_whole_s", "dist_padded_s",
                                           "map_s"))  # fmt: skip
    assert 0 < float(row["reused"]) < 1  # the states of one episode share the task and history lines
    assert float(row["max_score_difference"]) < 1e-4 and float(row["reuse_score_difference"]) < 1e-4
    assert row["command"].startswith("OMP_NUM_THREADS=")
    assert float(row["prompt_tokens"]) > 0 and row["history"] in ("", None)  # the env's default history


def test_prior_speed_history_sets_the_prompts_past_steps():
    """--history 0 times the datasets' prompts (no past steps); the default is each env's, as the scripts run."""
    default, bare = prior_speed.states_of("overcooked-tomato", 4), prior_speed.states_of("overcooked-tomato", 4,
                                                                                          steps=0)  # fmt: skip
    assert [a for _, a in default] == [a for _, a in bare]  # the same states
    assert default[0][0] == bare[0][0]  # the first state has no past anyway
    assert all(len(d) > len(b) and d.endswith(b[-200:]) for (d, _), (b, _) in zip(default[1:], bare[1:]))


def test_main_command_fresh_then_again(smoke, tmp_path):
    """benchmarks/main_command.py: the first run in a fresh HOME queries the LLM, the second answers every query from
    the score cache and evaluates the same; each row has its own wall-clock, memory and the CPU."""
    results = tmp_path / "results"
    argv = ["--results-dir", str(results), "--", "--prior.model", smoke["lm"], "--total-timesteps", "24",
            "--eval-freq", "12", "--eval-episodes", "1", "--learning-starts", "8"]  # fmt: skip
    assert main_command.main(argv) == 0
    fresh, again = common.read_csv(str(results / "main_command.csv"))
    assert (fresh["phase"], again["phase"]) == ("fresh", "again") and fresh["env_steps"] == again["env_steps"] == 24
    assert fresh["llm_queries"] > 0 and again["llm_queries"] == 0
    assert fresh["final_success"] == again["final_success"]
    assert fresh["wall_s"] > 0 and again["peak_rss_mb"] > 0 and "cores" in fresh["cpu"]
    assert fresh["command"] == "python dqn_prior.py --prior.model " + smoke["lm"] + " --total-timesteps 24 " \
        "--eval-freq 12 --eval-episodes 1 --learning-starts 8"


def test_prior_speed_floor_counts_the_rows_the_tree_scores(smoke, monkeypatch):
    """floor_head times the LM head at as many positions as score() runs it at: the prompt's end and the trie's inner
    nodes (shared prefixes once)."""
    import torch

    from llmprior.backends import TransformersBackend

    backend = TransformersBackend(smoke["lm"], torch.device("cpu"))
    prompt, actions = "Task: cook. Action:", ["go to cabinet 1", "go to cabinet 2", "take the pan", "look"]
    rows = []
    original = TransformersBackend._log_probs
    monkeypatch.setattr(TransformersBackend, "_log_probs",
                        lambda self, hidden, r, t: rows.append(hidden.shape[0]) or original(self, hidden, r, t))
    backend.score(prompt, actions)
    assert rows == [prior_speed.scored_rows(backend, prompt, actions)] and 1 < rows[0] < sum(
        len(backend.tokenizer(" " + a, add_special_tokens=False).input_ids) for a in actions)


def test_smoke_prior_sweep(smoke):
    """Each Q gets its own dataset (the same transitions, other proposals); the baselines run once per seed."""
    argv = ["--budget", "smoke", *smoke["dirs"], "--data-dir", str(smoke["base"] / "sweep_data")]
    assert prior_sweep.main(argv) == 0
    rows = read_rows(smoke, "prior_sweep_smoke")
    assert [(r["part"], r["algo"], r["q"]) for r in rows] == [
        ("online", "DQN-Prior", "0.0"), ("online", "DQN-Prior", "1.0"), ("online", "DQN", ""),
        ("offline", "CQL-Prior", "0.0"), ("offline", "CQL-Prior", "1.0"), ("offline", "DQN-Prior", "0.0"),
        ("offline", "DQN-Prior", "1.0"), ("offline", "CQL", ""), ("offline", "CQL (mean TD)", "")]  # fmt: skip
    assert all("--prior.synthetic-q" in r["command"] for r in rows if r["q"])
    # a perfect prior proposes only the expert's action: the expert's coverage, and its evaluation
    perfect = [r for r in rows if r["q"] == "1.0"]
    assert all(float(r["prior_coverage"]) == 1.0 for r in perfect if r["part"] == "online")
    assert all(float(r["final_success"]) == 1.0 for r in perfect)
    headers = [json.loads(open(p).readline()) for p in sorted(glob.glob(str(smoke["base"] / "sweep_data" / "*.jsonl")))]
    assert sorted(h["prior"] for h in headers) == ["synthetic:q=0:dist", "synthetic:q=1:dist"]
    assert len({h["transitions"] for h in headers}) == 1


def test_terminating_the_driver_stops_its_run_so_that_it_can_checkpoint(tmp_path):
    """`kill <driver>` reaches the running script as SIGINT (the scripts checkpoint on it) instead of orphaning it,
    also where the driver was started in the background with SIGINT ignored."""
    import signal
    import subprocess
    import time

    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(
        "import pathlib, sys, time\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--runs-dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'started').write_text('1')\n"
        "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    (out / 'checkpointed').write_text('1'); sys.exit(1)\n"
    )  # fmt: skip
    driver = subprocess.Popen([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); import common; "
        f"common.run_jobs([common.Job({{'a': 1}}, {str(sleeper)!r})], {str(tmp_path / 'entry')!r})")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `driver &` in a script starts it  # fmt: skip
    job_dir = tmp_path / "entry" / "1"
    for _ in range(600):
        if (job_dir / "started").exists():
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode != 0 and "rerun the same command to resume" in err
    assert (job_dir / "checkpointed").exists()


def test_printed_and_stored_commands_hide_the_api_key(capsys):
    """A key passed through to the scripts (`-- --prior.api-key ...`) is never printed or written by an entry."""
    assert common.hide_secrets(["a.py", "--prior.api-key", "sk-1", "--prior.api-key=sk-2", "--k", "5"]) == [
        "a.py", "--prior.api-key", "***", "--prior.api-key=***", "--k", "5"]  # fmt: skip
    assert table1_offline.main(["--budget", "small", "--dry-run", "--runs-dir", "/nonexistent/runs", "--results-dir",
                                "/nonexistent/results", "--", "--prior.api-key", "sk-secret"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "--prior.api-key ***" in printed and "sk-secret" not in printed


def test_a_resumed_run_keeps_its_command_and_counts_the_time_of_every_attempt(tmp_path):
    """A run that crashed (or lost its driver) and resumed from its checkpoint: the CSV's command is the one that
    reproduces it, without --resume, and its time is the whole run's, not the last attempt's."""
    script = tmp_path / "crashes_once.py"
    script.write_text(
        "import json, pathlib, sys\n"
        "run = pathlib.Path(sys.argv[sys.argv.index('--runs-dir') + 1]) / 'run'\n"
        "run.mkdir(parents=True, exist_ok=True)\n"
        "if '--resume' not in sys.argv:\n"
        "    (run / 'checkpoint.pt').write_text(json.dumps({'clock': 500.0})); sys.exit(1)\n"
        "clock = json.loads(pathlib.Path(sys.argv[sys.argv.index('--resume') + 1]).read_text())['clock']\n"
        "(run / 'summary.json').write_text(json.dumps({'wall_clock_s': clock + 1}))\n"
    )  # fmt: skip
    for driver_lost in (False, True):
        entry = tmp_path / f"entry_{driver_lost}"
        jobs = [common.Job({"a": 1}, str(script))]
        assert common.run_jobs(jobs, str(entry)) == ["1"]  # the first attempt crashes after its checkpoint
        first = json.load(open(entry / "1" / "job.json"))
        if driver_lost:  # its driver was killed with it: no job.json
            os.remove(entry / "1" / "job.json")
        assert common.run_jobs(jobs, str(entry)) == []
        job = json.load(open(entry / "1" / "job.json"))
        assert "--resume" not in job["command"] and job["command"] == first["command"]
        assert job["attempts"] == 2 and job["wall_clock_s"] >= (0 if driver_lost else first["wall_clock_s"])
        (row,) = common.save_results(jobs, str(entry), lambda run: {}, str(tmp_path / f"r_{driver_lost}.csv"))
        assert row["wall_clock_s"] == 501.0 and "--resume" not in row["command"]
