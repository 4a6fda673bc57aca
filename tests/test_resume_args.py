"""Resuming: a run takes its length and how it computes (device, micro-batch) from the resuming command line, keeps
everything else from its checkpoint, and warns about any other flag that differs (runs.resume_args)."""

import pytest
import tyro

import bc
import cql_prior
import dqn_prior
import gflan_prior
from llmprior import runs

# script, its total-length field
CASES = [(dqn_prior, "total_timesteps"), (cql_prior, "total_steps"), (gflan_prior, "total_timesteps"),
         (bc, "total_steps")]  # fmt: skip


@pytest.mark.parametrize("script, total", CASES, ids=[c[0].__name__ for c in CASES])
def test_resume_takes_its_length_and_device_from_the_command_line(script, total, capsys):
    saved = script.Args(learning_rate=1e-3, cuda=True, **{total: 10})
    argv = ["--resume", "ckpt.pt", f"--{total.replace('_', '-')}", "20", "--learning-rate", "5e-4", "--no-cuda"]
    args = runs.resume_args(tyro.cli(script.Args, args=argv), saved, script.RESUME_OVERRIDES, argv=argv)
    assert args.resume == "ckpt.pt" and getattr(args, total) == 20 and args.cuda is False  # taken
    assert args.learning_rate == 1e-3  # an algorithm setting: the checkpoint's, with a warning
    out, err = capsys.readouterr()
    assert "resuming with --cuda False (the checkpoint had True)" in out
    assert "--learning-rate 0.0005 ignored" in err and "learning-rate" not in out


@pytest.mark.parametrize("script", [gflan_prior, bc])
def test_a_default_value_counts_when_the_flag_is_named(script):
    """--policy.micro-batch 16 (the default) resets a checkpoint's 4; left out, the checkpoint's 4 stays."""
    saved = script.Args(policy=script.PolicyArgs(micro_batch=4))
    argv = ["--resume", "ckpt.pt"]
    kept = runs.resume_args(tyro.cli(script.Args, args=argv), saved, script.RESUME_OVERRIDES, argv=argv)
    assert kept.policy.micro_batch == 4
    argv += ["--policy.micro-batch", "16"]
    reset = runs.resume_args(tyro.cli(script.Args, args=argv), saved, script.RESUME_OVERRIDES, argv=argv)
    assert reset.policy.micro_batch == 16


@pytest.mark.parametrize("script, total", CASES, ids=[c[0].__name__ for c in CASES])
def test_resume_without_a_new_total_runs_to_the_checkpoints(script, total):
    saved = script.Args(**{total: 200})
    argv = ["--resume", "ckpt.pt"]
    args = runs.resume_args(tyro.cli(script.Args, args=argv), saved, script.RESUME_OVERRIDES, argv=argv)
    assert getattr(args, total) == 200


@pytest.mark.parametrize("script", [dqn_prior, cql_prior, gflan_prior, bc])
def test_arguments_round_trip_through_a_checkpoint(script):
    """A checkpoint keeps `dataclasses.asdict(args)`; from_dict rebuilds the nested dataclasses."""
    import dataclasses

    args = tyro.cli(script.Args, args=["--seed", "7"])
    assert runs.from_dict(script.Args, dataclasses.asdict(args)) == args
