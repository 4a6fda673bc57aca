"""Resuming on another machine: every script takes its execution settings (device, micro-batch, threads, LLM
server) from the command line of the resuming run, keeps everything else from the checkpoint, and warns about any
other flag that differs."""

import pytest
import tyro

import bc
import cql_prior
import dqn_prior
import gflan_prior

# script, its total-length field, and an execution setting of a nested argument group it has
CASES = [
    (dqn_prior, "total_timesteps", "--prior.base-url", "base_url"),
    (cql_prior, "total_steps", "--prior.base-url", "base_url"),
    (gflan_prior, "total_timesteps", "--policy.micro-batch", "micro_batch"),
    (bc, "total_steps", "--policy.micro-batch", "micro_batch"),
]


def group_of(args, flag):
    return getattr(args, flag[2:].split(".")[0])


@pytest.mark.parametrize("script, total, flag, name", CASES, ids=[c[0].__name__ for c in CASES])
def test_resume_takes_execution_settings_from_the_command_line(script, total, flag, name, capsys):
    saved = script.Args(learning_rate=1e-3, cuda=True, **{total: 10})
    group = group_of(saved, flag)
    old_value = getattr(group, name)
    new_value = 8 if isinstance(old_value, int) else "http://other-host:8000/v1"
    argv = ["--resume", "ckpt.pt", f"--{total.replace('_', '-')}", "20", "--learning-rate", "5e-4", "--no-cuda",
            flag, str(new_value)]  # fmt: skip
    cli = tyro.cli(script.Args, args=argv)  # the flags exactly as tyro names them
    args = script.resume_args(cli, saved, argv=argv)
    assert args.resume == "ckpt.pt" and getattr(args, total) == 20  # from the command line
    assert getattr(group_of(args, flag), name) == new_value and args.cuda is False  # execution settings: taken
    assert args.learning_rate == 1e-3  # an algorithm setting: the checkpoint's, with a warning
    out, err = capsys.readouterr()
    assert f"resuming with {flag} {new_value}" in out and "--cuda False" in out
    assert "--learning-rate 0.0005 ignored" in err and "learning-rate" not in out


@pytest.mark.parametrize("script, total, flag, name", CASES, ids=[c[0].__name__ for c in CASES])
def test_resume_can_set_an_execution_setting_back_to_its_default(script, total, flag, name):
    """A default value counts when the flag is given, and only then: unnamed defaults never override the checkpoint."""
    default = getattr(group_of(script.Args(), flag), name)
    changed = default * 4 if isinstance(default, int) else "http://other-host:8000/v1"
    saved = script.Args(**{total: 10})
    setattr(group_of(saved, flag), name, changed)
    argv = ["--resume", "ckpt.pt"]
    kept = script.resume_args(tyro.cli(script.Args, args=argv), saved, argv=argv)
    assert getattr(group_of(kept, flag), name) == changed
    argv += [flag, str(default)]
    reset = script.resume_args(tyro.cli(script.Args, args=argv), saved, argv=argv)
    assert getattr(group_of(reset, flag), name) == default


def test_resume_prints_no_api_key(capsys):
    saved = dqn_prior.Args()
    saved.prior.api_key = "sk-old-secret"
    argv = ["--resume", "ckpt.pt", "--prior.api-key", "sk-new-secret"]
    args = dqn_prior.resume_args(tyro.cli(dqn_prior.Args, args=argv), saved, argv=argv)
    assert args.prior.api_key == "sk-new-secret"
    out, err = capsys.readouterr()
    assert "resuming with --prior.api-key ***" in out and "secret" not in out + err


@pytest.mark.parametrize("script", [dqn_prior, cql_prior, gflan_prior], ids=lambda s: s.__name__)
def test_saved_args_never_hold_the_api_key(script):
    """What a run writes (args.json, TensorBoard, wandb, checkpoints, build_dataset's header) has no API key."""
    args = script.Args()
    args.prior.api_key, args.prior.base_url = "sk-secret", "http://host:1/v1"
    saved = script.saved_args(args)
    assert saved["prior"]["api_key"] is None and saved["prior"]["base_url"] == "http://host:1/v1"
    assert args.prior.api_key == "sk-secret"  # the run itself keeps it
    assert "sk-secret" not in str(saved)


@pytest.mark.parametrize("script, total, flag, name", CASES, ids=[c[0].__name__ for c in CASES])
def test_resume_without_a_new_total_runs_to_the_checkpoints(script, total, flag, name):
    """`--resume ckpt` alone finishes the interrupted run: its total is the checkpoint's, not the flag's default."""
    saved = script.Args(**{total: 10})
    argv = ["--resume", "ckpt.pt"]
    args = script.resume_args(tyro.cli(script.Args, args=argv), saved, argv=argv)
    assert getattr(args, total) == 10
