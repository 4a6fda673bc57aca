"""bc.py: the loss against hand-computed values, the dataset reader, and subprocess runs of the script (a tiny random
LM; the embedded one in the slow test)."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, script_runner, summary_of

import envs
from bc import bc_loss, bc_samples
from llmprior.data import DATASET_FORMAT, DatasetError, load_dataset
from llmprior.policy import load_policy
from llmprior.prompts import policy_prompt

CORPUS = [
    "Possible action of the agent: Go Left, Go Right, Go Up, Go Down Goal of the agent: Reach the goal (G)",
    "Observation 0: You are in a 4x4 grid where each cell is either a frozen cell (F) indicating a safe position",
    "Currently the agent is at position (0, 0), which direction need to take? leads to position start hole (H)",
]


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_model):
    """A random causal LM + BPE tokenizer saved as a local HF folder (the same load path as a real model)."""
    return tiny_model("llama", CORPUS, name="bc-llama")


def write_frozenlake_dataset(path, episodes: int = 4, action: str = "Go Down") -> list[dict]:
    """Transitions of episodes that walk the expert path but always record `action` as the data action, so the
    right answer is the same in every state."""
    env = envs.make("frozenlake")
    records = []
    for ep in range(episodes):
        obs, info = env.reset(seed=ep)
        for step, a in enumerate(["Go Down", "Go Down", "Go Right"]):
            next_obs, reward, terminated, truncated, next_info = env.step(a)
            records.append({"episode": ep, "step": step, "task": info["task"], "obs": obs,
                            "admissible": info["admissible_actions"], "action": action, "reward": reward,
                            "next_obs": next_obs, "next_admissible": next_info["admissible_actions"],
                            "terminated": terminated, "truncated": truncated, "proposals": None,
                            "next_proposals": None})  # fmt: skip
            obs, info = next_obs, next_info
    with open(path, "w") as f:
        f.write(json.dumps({"format": DATASET_FORMAT, "version": 1, "env": "frozenlake", "prior": None, "k": 0}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def test_bc_loss_hand_computed():
    scores = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])
    actions = torch.tensor([1, 1])
    expected = (-math.log(3 / 4) - math.log(1 / 3)) / 2
    assert bc_loss(scores, actions).item() == pytest.approx(expected, abs=1e-6)
    assert bc_loss(scores, actions, reduction="sum").item() == pytest.approx(2 * expected, abs=1e-6)
    padded = torch.tensor([[0.0, math.log(3.0), -math.inf]])
    assert bc_loss(padded, torch.tensor([1])).item() == pytest.approx(-math.log(3 / 4), abs=1e-6)


def test_dataset_reader_rebuilds_the_prompt_history(tmp_path):
    records = write_frozenlake_dataset(tmp_path / "d.jsonl", episodes=2)
    header, loaded = load_dataset(str(tmp_path / "d.jsonl"))
    assert header["env"] == "frozenlake" and loaded == records
    samples = bc_samples(list(reversed(loaded)), history=1)  # order in the file does not matter
    third = [s for s in samples if "agent is at position (2, 0)" in s["prompt"].split("Observation 1:")[-1]][0]
    assert third["prompt"] == policy_prompt(records[2]["task"], records[2]["obs"], records[2]["admissible"],
                                            [(records[1]["obs"], records[1]["action"])])  # fmt: skip
    assert third["actions"][third["index"]] == "Go Down"
    assert all("Observation 1:" not in s["prompt"] for s in bc_samples(loaded, history=0))


def test_not_a_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"format": "x", "version": 1, "env": "e", "prior": None, "k": 0})
                                      + "\n{}\n")  # fmt: skip
    with pytest.raises(DatasetError, match="'format' is 'x', not 'llmprior-offline-transitions'"):
        load_dataset(str(tmp_path / "x.jsonl"))


run_script = script_runner("bc.py")


def test_bc_learns_the_always_right_action(tiny_lm_dir, tmp_path):
    """One action is right in every state: BC drives its probability above 0.9 (checked on the saved policy)."""
    records = write_frozenlake_dataset(tmp_path / "d.jsonl")
    summary = summary_of(run_script("--dataset", str(tmp_path / "d.jsonl"), "--policy.model", tiny_lm_dir,
                                    "--policy.lora-layers", "0", "--learning-rate", "3e-3", "--total-steps", "40",
                                    "--batch-size", "8", "--eval-freq", "40", "--eval-episodes", "1", "--runs-dir",
                                    str(tmp_path)))  # fmt: skip
    assert summary["global_step"] == 40 and summary["final_data_action_prob"] > 0.9
    policy = load_policy(tiny_lm_dir, torch.device("cpu"), lora_r=0)
    policy.load_state_dict(torch.load(glob.glob(str(tmp_path / "*" / "policy.pt"))[0]), strict=False)
    samples = bc_samples(records, history=0)
    with torch.no_grad():
        probs = torch.softmax(policy([s["prompt"] for s in samples], [s["actions"] for s in samples])[0], -1)
    assert all(p[s["index"]] > 0.9 for p, s in zip(probs, samples))


def test_bc_resume_is_exact(tiny_lm_dir, tmp_path, monkeypatch):
    """A run lengthened on resume, and a run stopped (SIGINT) in the middle of a gradient step's micro-batches, end on
    exactly the policy and evaluations of the run that went straight through."""
    import signal

    import bc
    from llmprior import runs

    write_frozenlake_dataset(tmp_path / "d.jsonl")
    common = ["--dataset", str(tmp_path / "d.jsonl"), "--policy.model", tiny_lm_dir, "--batch-size", "5",
              "--policy.micro-batch", "2", "--eval-freq", "4", "--eval-episodes", "1", "--runs-dir", str(tmp_path)]
    run_script(*common, "--total-steps", "8", "--exp-name", "full")
    run_script(*common, "--total-steps", "3", "--exp-name", "part")
    resumed = summary_of(run_script("--resume", glob.glob(str(tmp_path / "*part*" / "checkpoint.pt"))[0],
                                    "--total-steps", "8"))  # fmt: skip
    assert resumed["global_step"] == 8
    full = glob.glob(str(tmp_path / "*full*"))[0]
    a = torch.load(os.path.join(full, "policy.pt"))
    b = torch.load(glob.glob(str(tmp_path / "*part*" / "policy.pt"))[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real, calls = bc.bc_loss, [0]

    def interrupting(*a, **kw):  # a chunk (the distinct states of a batch, 2 at a time) of gradient step 3 or 4
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(bc, "bc_loss", interrupting)
    args = bc.Args(dataset=str(tmp_path / "d.jsonl"), total_steps=8, batch_size=5, eval_freq=4, eval_episodes=1,
                   exp_name="stopped", runs_dir=str(tmp_path / "stopped"),
                   policy=bc.PolicyArgs(model=tiny_lm_dir, micro_batch=2))  # fmt: skip
    with pytest.raises(runs.Stopped, match="stopped by SIGINT at gradient step [234]"):
        bc.train(args)
    monkeypatch.undo()
    stopped = glob.glob(str(tmp_path / "stopped" / "*"))[0]
    bc.train(bc.Args(resume=os.path.join(stopped, "checkpoint.pt")))
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])
    c = torch.load(os.path.join(stopped, "policy.pt"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert open(os.path.join(stopped, "eval.jsonl")).read() == open(os.path.join(full, "eval.jsonl")).read()


def test_bc_resume_on_another_machine_takes_its_micro_batch(tiny_lm_dir, tmp_path):
    """A checkpoint from a big machine goes on with a smaller micro-batch (an execution setting); its learning rate
    (an algorithm setting) stays, whatever the resuming command line says; its count of skipped steps goes on."""
    write_frozenlake_dataset(tmp_path / "d.jsonl")
    run_script("--dataset", str(tmp_path / "d.jsonl"), "--policy.model", tiny_lm_dir, "--batch-size", "5",
               "--eval-freq", "100", "--eval-episodes", "1", "--runs-dir", str(tmp_path), "--total-steps", "2")
    ckpt = glob.glob(str(tmp_path / "*" / "checkpoint.pt"))[0]
    state = torch.load(ckpt, weights_only=False)
    state["loop"]["skipped"] = 3  # skipped steps count on from here
    torch.save(state, ckpt)
    result = run_script("--resume", ckpt, "--total-steps", "4", "--policy.micro-batch", "2", "--learning-rate", "0.5")
    assert summary_of(result)["global_step"] == 4 and summary_of(result)["skipped_steps"] == 3
    assert "resuming with --policy.micro-batch 2 (the checkpoint had 16)" in result.stdout
    assert "--learning-rate 0.5 ignored" in result.stderr
    saved = torch.load(ckpt, weights_only=False)["args"]
    assert saved["policy"]["micro_batch"] == 2 and saved["learning_rate"] == 1e-4


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = run_script("--runs-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and "--dataset" in result.stderr and not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_embedded_model(tmp_path):
    write_frozenlake_dataset(tmp_path / "d.jsonl", episodes=1)
    summary = summary_of(run_script("--dataset", str(tmp_path / "d.jsonl"), "--total-steps", "2", "--batch-size", "3",
                                    "--eval-episodes", "1", "--runs-dir", str(tmp_path)))  # fmt: skip
    assert summary["global_step"] == 2 and summary["final_bc_loss"] > 0


def test_lm_policy_speed_benchmark_reports_the_batch_loss(tiny_lm_dir, tmp_path):
    """benchmarks/lm_policy_speed.py times BC's forward and backward on the batch BC's first step would draw; its
    loss is bc_loss on those samples."""
    write_frozenlake_dataset(tmp_path / "d.jsonl")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lm_policy_speed.py"), "--dataset",
                          str(tmp_path / "d.jsonl"), "--prompts", "5", "--repeats", "1", "--threads", "1",
                          "--model", tiny_lm_dir], capture_output=True, text=True, check=True)  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    samples = bc_samples(load_dataset(str(tmp_path / "d.jsonl"))[1], history=0)
    batch = [samples[int(i)] for i in np.random.default_rng(1).permutation(len(samples))[:5]]
    torch.manual_seed(1)
    policy = load_policy(tiny_lm_dir, torch.device("cpu"))
    with torch.no_grad():
        scores = policy([s["prompt"] for s in batch], [s["actions"] for s in batch])[0]
    loss = bc_loss(scores, torch.as_tensor([s["index"] for s in batch])).item()
    assert report["prompts"] == 5 and len(report["forward_backward_s"]) == 1 and report["peak_mb"] > 0
    assert report["actions"] == sum(len(s["actions"]) for s in batch)
    assert report["loss"] == pytest.approx(loss, abs=1e-5)
