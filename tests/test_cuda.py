"""The CUDA path, for a GPU box: `python -m pytest -m cuda` (every test here is skipped where torch sees no GPU).

The same code as on CPU with the prior, the encoder and the networks on the GPU: the batched, KV-cached action
scoring matches the slow CPU reference in float32 and stays close to it in bfloat16 (the default dtype on a GPU that
has it); every prior mode returns admissible actions, the same ones on a rerun; the LM policy's frozen-trunk cache
gives the whole model's scores and gradients; the four scripts train, evaluate and report the device, and
dqn_prior.py resumes exactly. Tiny random models throughout, so nothing needs a download or the embedded models'
packages. `LLMPRIOR_TEST_DEVICE=cpu` runs the same checks on the CPU (to check the checks where there is no GPU).
"""

import glob
import json
import os

import numpy as np
import pytest
import torch
from helpers import last_json, reference_logliks, run_script, summary_of
from test_bc import write_frozenlake_dataset
from test_gflan import scores_and_grads, trunk_policy
from test_prior import CABINETS, CORPUS, PROMPT, TOMATO_ACTIONS
from transformers import AutoModelForCausalLM

from dqn_prior import LLMPrior, PriorArgs
from llmprior.backends import TransformersBackend, continuation_ids
from llmprior.encoder import TextEncoder

DEVICE = os.environ.get("LLMPRIOR_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=["llama", "gemma3-sliding"])
def lm_dir(request, tiny_model):
    return tiny_model(request.param, CORPUS, name=f"cuda-{request.param}", vocab_size=400)


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama", CORPUS, name="cuda-llama", vocab_size=400)


@pytest.fixture(scope="module")
def bert_dir(tiny_model):
    return tiny_model("bert", CORPUS, name="cuda-bert", vocab_size=400, max_position_embeddings=512)


def cuda_prior(folder, dtype=None, **kw) -> LLMPrior:
    """The prior on the device, in its default dtype (bfloat16 on a GPU that has it) or in `dtype`."""
    prior = LLMPrior(PriorArgs(model=folder, cache="off", dist_temperature=1.0, **kw), 0, torch.device(DEVICE))
    if dtype is not None:
        prior.backend = TransformersBackend(folder, torch.device(DEVICE), dtype)
    return prior


def test_dist_scores_on_cuda_float32_match_the_cpu_reference(lm_dir):
    prior = cuda_prior(lm_dir, mode="dist", dtype="float32")
    assert prior.backend.numerics == f"{DEVICE}:float32" and prior.backend.model.device.type == DEVICE
    cpu_model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    actions = CABINETS + TOMATO_ACTIONS
    pairs = [continuation_ids(prior.backend.tokenizer, PROMPT, a) for a in actions]
    ref = np.array(reference_logliks(cpu_model, pairs))
    np.testing.assert_allclose(prior.backend.score(PROMPT, actions)[0], ref, atol=1e-4, rtol=0)
    probs = prior.distribution(PROMPT, actions)
    assert abs(probs.sum() - 1.0) < 1e-9
    np.testing.assert_allclose(probs, np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum(), atol=1e-4)


def test_bfloat16_is_the_cuda_default_and_close_to_float32(lm_dir):
    if DEVICE != "cuda" or not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    bf16 = cuda_prior(lm_dir, mode="dist")
    assert bf16.backend.numerics == "cuda:bfloat16"  # dtype "auto"
    fp32 = cuda_prior(lm_dir, mode="dist", dtype="float32")
    for actions in (TOMATO_ACTIONS, CABINETS + TOMATO_ACTIONS):
        p16, p32 = bf16.distribution(PROMPT, actions), fp32.distribution(PROMPT, actions)
        assert abs(p16.sum() - 1.0) < 1e-6
        np.testing.assert_allclose(p16, p32, atol=0.03)


@pytest.mark.parametrize("mode", ["map", "dist", "constrained"])
def test_modes_on_cuda_return_k_admissible_actions_reproducibly(lm_dir, mode):
    first, again = cuda_prior(lm_dir, mode=mode), cuda_prior(lm_dir, mode=mode)
    for actions in (TOMATO_ACTIONS, CABINETS):
        proposals = first.propose(PROMPT, actions, 5)
        assert len(proposals) == 5 and all(p in actions for p in proposals)
        assert again.propose(PROMPT, actions, 5) == proposals


def test_encoder_on_cuda_matches_cpu(bert_dir):
    texts = [PROMPT + " " + a for a in TOMATO_ACTIONS] + CABINETS
    gpu = TextEncoder(bert_dir, torch.device(DEVICE), cache=False)
    cpu = TextEncoder(bert_dir, torch.device("cpu"), cache=False)
    gpu_rows, cpu_rows = gpu.ids(texts), cpu.ids(texts)
    assert gpu.table.device.type == DEVICE
    torch.testing.assert_close(gpu.table[gpu_rows].cpu(), cpu.table[cpu_rows], atol=1e-4, rtol=1e-4)


def tiny_args(llama_dir, bert_dir, tmp_path):
    return ["--prior.model", llama_dir, "--encoder", bert_dir, "--prior.cache", str(tmp_path / "priors.sqlite"),
            "--runs-dir", str(tmp_path)]  # fmt: skip


def test_dqn_prior_trains_and_resumes_exactly_on_cuda(llama_dir, bert_dir, tmp_path):
    common = ["--env", "overcooked-tomato", "--k", "3", "--learning-starts", "16", "--eval-freq", "60",
              "--eval-episodes", "1", *tiny_args(llama_dir, bert_dir, tmp_path)]  # fmt: skip
    full = summary_of(run_script("dqn_prior.py", *common, "--total-timesteps", "120", "--exp-name", "full"))
    assert full["device"] == DEVICE and full["global_step"] == 120 and full["prior_queries"] > 0
    assert 0.0 <= full["prior_coverage"] <= 1.0
    run_script("dqn_prior.py", *common, "--total-timesteps", "60", "--exp-name", "part")
    ckpt = glob.glob(str(tmp_path / "*part*" / "checkpoint.pt"))[0]
    resumed = summary_of(run_script("dqn_prior.py", "--resume", ckpt, "--total-timesteps", "120"))
    assert resumed["device"] == DEVICE and resumed["global_step"] == 120
    a = torch.load(glob.glob(str(tmp_path / "*full*" / "q_network.pt"))[0])
    b = torch.load(glob.glob(str(tmp_path / "*part*" / "q_network.pt"))[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_dataset_and_cql_prior_on_cuda(llama_dir, bert_dir, tmp_path):
    data = tmp_path / "salad.jsonl"
    prior = ["--prior.model", llama_dir, "--k", "2", "--prior.cache", str(tmp_path / "priors.sqlite")]
    info = last_json(run_script("build_dataset.py", "--transitions", "60", "--out", str(data), "--mix.prior", "0.5",
                                *prior), "dataset ")  # fmt: skip
    assert info["prior_queries"] > 0
    summary = summary_of(run_script("cql_prior.py", "--dataset", str(data), "--total-steps", "100", "--eval-freq", "100",
                                    "--eval-episodes", "1", "--encoder", bert_dir, "--runs-dir", str(tmp_path),
                                    *prior))  # fmt: skip
    assert summary["device"] == DEVICE and summary["global_step"] == 100 and summary["dataset_prior_queries"] == 0


@pytest.mark.parametrize("variant", [["--kl-coef", "0.5"], ["--kl-coef", "0", "--sub-action-space"]])
def test_gflan_prior_trains_on_cuda(llama_dir, tmp_path, variant):
    summary = summary_of(run_script("gflan_prior.py", "--env", "frozenlake", "--policy.model", llama_dir,
                                    "--prior.model", llama_dir, "--prior.cache", "off", "--num-envs", "2",
                                    "--num-steps", "8", "--update-epochs", "2", "--eval-episodes", "1",
                                    "--eval-freq", "32", "--total-timesteps", "32", "--runs-dir", str(tmp_path),
                                    *variant))  # fmt: skip
    assert summary["device"] == DEVICE and summary["global_step"] == 32 and summary["prior_queries"] > 0
    evals = [json.loads(l) for l in open(glob.glob(str(tmp_path / "*" / "eval.jsonl"))[0])]
    assert evals and all(np.isfinite(e["eval/return_mean"]) for e in evals)


def test_bc_trains_on_cuda(llama_dir, tmp_path):
    write_frozenlake_dataset(tmp_path / "d.jsonl")
    summary = summary_of(run_script("bc.py", "--dataset", str(tmp_path / "d.jsonl"), "--policy.model", llama_dir,
                                    "--total-steps", "6", "--batch-size", "4", "--eval-freq", "6",
                                    "--eval-episodes", "1", "--runs-dir", str(tmp_path)))  # fmt: skip
    assert summary["device"] == DEVICE and summary["global_step"] == 6 and np.isfinite(summary["final_bc_loss"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_policy_trunk_cache_matches_the_whole_model(lm_dir, dtype):
    """The LM policy's frozen-trunk cache (LoRA on the top block of two) gives the whole model's scores, values and
    gradients on the device, on the first call and from the cache."""
    prompts = [PROMPT, "Goal of the agent: put a clean tomato in the fridge \n Action 0:"]
    actions = [TOMATO_ACTIONS[:4], TOMATO_ACTIONS[2:5]]
    results = []
    for trunk_cache_mb in (0, 64):
        policy = trunk_policy(lm_dir, trunk_cache_mb, DEVICE, dtype)
        for _ in range(2):
            results.append([t.float() for t in scores_and_grads(policy, prompts, actions)])
    assert policy.trunk_cache_bytes > 0 and len(policy._trunk) == 2
    tol = 1e-4 if dtype == "float32" else 5e-2
    for whole, split in zip(results[:2], results[2:]):
        for w, s in zip(whole, split):
            torch.testing.assert_close(s, w, atol=tol, rtol=tol)
