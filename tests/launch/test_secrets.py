"""Credentials never reach configs, run directories, command-line records or error messages.

Each pattern of the security review is tried where a user would put it: refused by the launcher's validation,
or redacted where it is written or printed. A test never finds the secret itself in what it checks.
"""
from __future__ import annotations

import json
import socket
import sys
import traceback
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from gd.launch import LaunchError
from gd.launch.validate import validate
from gd.secrets import redact, redacted_yaml
from tests.launch.conftest import compose_cfg

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCY"


def _rejected(*overrides: str) -> str:
    cfg = compose_cfg("+cluster=slurm", "+exp=groupdiff4", *overrides)
    with open_dict(cfg):
        cfg.launcher.check_data = False
    with pytest.raises(LaunchError) as err:
        validate(cfg)
    return str(err.value)


@pytest.mark.parametrize("override,where,kind", [
    (f"cluster.setup=['export AWS_SECRET_ACCESS_KEY={SECRET}']", "cluster.setup[0]",
     "a credential assignment to AWS_SECRET_ACCESS_KEY"),
    (f"+cluster.sbatch_extra.export='ALL,AWS_SECRET_ACCESS_KEY={SECRET}'", "cluster.sbatch_extra.export",
     "a credential assignment to AWS_SECRET_ACCESS_KEY"),
    (f"+cluster.env.S3_ENDPOINT_URL=http://alice:{SECRET}@127.0.0.1:9000", "cluster.env.S3_ENDPOINT_URL",
     "a password in a URL"),
    (f"data.root=s3://alice:{SECRET}@bucket/shards", "data.root", "a password in a URL"),
    (f"+data.conn='DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET}'", "data.conn",
     "an Azure/SAS account key"),
    (f"cluster.setup=['export HF_TOKEN=hf_{SECRET}abcdef']", "cluster.setup[0]", "an API token"),
    ("cluster.setup=['export HF_TOKEN=${oc.env:HF_TOKEN}']", "cluster.setup[0]", "an interpolated credential"),
    ("+cluster.comment=AKIAIOSFODNN7EXAMPLE", "cluster.comment", "an AWS access key id"),
    (f"+data.api_token={SECRET}", "data.api_token", "named like a credential and has a literal value"),
    # quoted values and hyphenated flags (fail before the fix: both passed the scan and reached the sbatch script)
    (f"cluster.setup=['export AWS_SECRET_ACCESS_KEY=\"{SECRET}\"']", "cluster.setup[0]",
     "a credential assignment to AWS_SECRET_ACCESS_KEY"),
    (f"cluster.setup=[\"export HF_TOKEN='{SECRET} x'\"]", "cluster.setup[0]", "a credential assignment to HF_TOKEN"),
    (f"cluster.setup=['mytool --api-key {SECRET}']", "cluster.setup[0]", "a credential assignment to --api-key"),
    (f"cluster.setup=['mytool --access-key=\"{SECRET}\"']", "cluster.setup[0]",
     "a credential assignment to --access-key"),
])
def test_credentials_anywhere_in_the_config_are_refused(override, where, kind):
    """Fails before the fix: only cluster.env key names were checked, so each of these was submitted and written
    into launch.yaml, config.yaml, checkpoints and the sbatch script."""
    msg = _rejected(override)
    assert where in msg and kind in msg, msg
    assert SECRET not in msg and "AKIAIOSFODNN7EXAMPLE" not in msg


def test_azure_connection_string_variable_in_cluster_env_is_refused():
    """Fails before the fix: AZURE_STORAGE_CONNECTION_STRING has none of KEY/SECRET/TOKEN/PASSWORD/CREDENTIAL."""
    msg = _rejected("+cluster.env.AZURE_STORAGE_CONNECTION_STRING='AccountName=a'")
    assert "cluster.env sets AZURE_STORAGE_CONNECTION_STRING" in msg


def test_env_references_and_shell_references_pass():
    """Credentials from the environment are the supported way: ${oc.env:...} outside the job script and $VAR in
    setup lines are accepted (and a plain endpoint URL, model key names like num_tokens)."""
    cfg = compose_cfg("+cluster=slurm", "+exp=groupdiff4", "+data.api_token=${oc.env:GD_TOKEN,unset}",
                      "cluster.setup=['export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY']",
                      "+cluster.env.S3_ENDPOINT_URL=http://127.0.0.1:9000", "+train.deepspeed.num_tokens=256")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    validate(cfg)


def test_stored_configs_are_redacted(monkeypatch):
    """Fails before the fix: OmegaConf.to_yaml(cfg, resolve=True) wrote ${oc.env:...} secrets into config.yaml."""
    monkeypatch.setenv("GD_TEST_TOKEN", SECRET)
    monkeypatch.setenv("GD_TEST_ENDPOINT", f"http://alice:{SECRET}@127.0.0.1:9000")
    cfg = OmegaConf.create({"data": {"api_token": "${oc.env:GD_TEST_TOKEN}", "endpoint": "${oc.env:GD_TEST_ENDPOINT}",
                                     "alias": "${data.api_token}", "root": "s3://bucket/x"},
                            "cluster": {"setup": ["module load cuda", "export HF_TOKEN=${oc.env:GD_TEST_TOKEN}"]}})
    text = redacted_yaml(cfg)
    assert SECRET not in text
    got = OmegaConf.create(text)
    assert got.data.api_token == got.data.alias == "***" and got.data.endpoint == "http://***@127.0.0.1:9000"
    assert got.data.root == "s3://bucket/x" and got.cluster.setup[0] == "module load cuda"
    # launch.yaml keeps interpolations as they are (they hold no secret until resolved)
    unresolved = OmegaConf.to_container(OmegaConf.create(redacted_yaml(cfg, resolve=False)), resolve=False)
    assert unresolved["data"]["api_token"] == "${oc.env:GD_TEST_TOKEN}"
    assert unresolved["cluster"]["setup"][1] == "export HF_TOKEN=${oc.env:GD_TEST_TOKEN}"


def test_launches_jsonl_stores_a_redacted_command_line(tmp_path, monkeypatch):
    """Fails before the fix: sys.argv went into launches.jsonl verbatim."""
    from gd.launch.submit import _append_launch

    argv = ["gd.launch", "+cluster=local", f"+x.api_token={SECRET}", f"+x.url=http://bob:{SECRET}@host:1/b"]
    monkeypatch.setattr(sys, "argv", argv)
    cfg = OmegaConf.create({"cluster": {"kind": "local"}, "task": "train"})
    _append_launch(tmp_path, cfg, "123", tmp_path / "submitit")
    text = (tmp_path / "launches.jsonl").read_text()
    assert SECRET not in text
    assert json.loads(text)["argv"] == ["+cluster=local", "+x.api_token=***", "+x.url=http://***@host:1/b"]


def test_endpoint_password_is_not_printed_in_s3_errors(monkeypatch):
    """Fails before the fix: the error named S3_ENDPOINT_URL verbatim, and botocore's chained exception quoted it."""
    from gd.data.loader import check_dataset

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://alice:{SECRET}@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(ConnectionError) as err:
        check_dataset("s3://bucket/shards")
    printed = "".join(traceback.format_exception(err.value))
    assert f"http://***@127.0.0.1:{port}" in str(err.value)
    assert SECRET not in printed


@pytest.mark.parametrize("text,want", [
    ("export AWS_SECRET_ACCESS_KEY=abcdefgh123", "export AWS_SECRET_ACCESS_KEY=***"),
    ("--password hunter2222", "--password ***"),
    ("https://h/x?sig=abc123&se=2030", "https://h/x?sig=***&se=2030"),
    ("Authorization: Bearer abcdefghijkl", "Authorization: Bearer ***"),
    ("export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY", "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"),
    ("tokenizer=bpe num_tokens=256 runs/key_frames", "tokenizer=bpe num_tokens=256 runs/key_frames"),
    ('export AWS_SECRET_ACCESS_KEY="abc def gh1"', 'export AWS_SECRET_ACCESS_KEY="***"'),
    ("--api-key 'abcdefgh123' --steps 10", "--api-key '***' --steps 10"),
    ("--api-key abcdefgh123", "--api-key ***"),
    ('export AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"', 'export AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"'),
])
def test_redact_keeps_names_and_drops_values(text, want):
    """Catches an over-eager pattern (config words like num_tokens) as well as a missed one."""
    assert redact(text) == want


def test_secret_in_run_dir_files_is_found_by_grep(tmp_path):
    """The helper the run-dir tests rely on: it must find a planted secret in a nested binary file."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"\x00\x01" + SECRET.encode() + b"\x02")
    assert grep_tree(tmp_path, SECRET) == [tmp_path / "a" / "b" / "x.bin"]



def _entry(module: str, *args: str, **env: str):
    import os
    import subprocess

    from tests.launch.conftest import REPO

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", **env})


@pytest.mark.parametrize("module", ["gd.launch", "gd.train", "gd.sample", "gd.evaluate", "gd.build_shards"])
def test_entry_points_do_not_echo_a_secret_override_when_the_config_does_not_compose(module):
    """Fails before the fix: hydra's composition error quoted the override back ("To append to your config use
    +api_token=<the secret>") on every entry point."""
    done = _entry(module, f"api_token={SECRET}")
    printed = done.stdout + done.stderr
    assert done.returncode != 0 and "Could not override 'api_token'" in printed, printed
    assert "+api_token=***" in printed and SECRET not in printed, printed


@pytest.mark.parametrize("full_error", ["0", "1"])
def test_a_failing_job_does_not_echo_a_secret_override(tmp_path, full_error):
    """Fails before the fix: "Error executing job with overrides: ['+data.api_token=<the secret>', ...]" after any
    failure in the job (here a missing checkpoint), and with HYDRA_FULL_ERROR=1 the raised composition error."""
    done = _entry("gd.sample", f"+sample.model_overrides.api_token={SECRET}", f"ckpt={tmp_path / 'missing.pt'}",
                  HYDRA_FULL_ERROR=full_error)
    printed = done.stdout + done.stderr
    assert done.returncode != 0 and "missing.pt' does not exist" in printed, printed
    if full_error == "0":
        assert "Error executing job with overrides: ['+sample.model_overrides.api_token=***'" in printed, printed
    assert SECRET not in printed, printed


def test_output_redactor_removes_a_value_echoed_alone_and_keeps_the_rest():
    """A message may quote an override's value without its key (a type error); the job's own output, printed
    inside passthrough, is left as it is (line buffering would hold back progress bars)."""
    import io

    from gd.secrets import output_redactor, redacted_output

    clean = output_redactor(["+exp=demo", "data.password=hunter2!", "cluster.setup=['x --api-key abcdefgh']"])
    assert clean("Value 'hunter2!' could not be converted; abcdefgh; +exp=demo") == \
        "Value '***' could not be converted; ***; +exp=demo"
    out = io.StringIO()
    real = sys.stdout
    sys.stdout = out
    try:
        with redacted_output(["data.password=hunter2!"]) as guard:
            print("Error executing job with overrides: ['data.password=", end="")
            print("hunter2!']")
            with guard.passthrough():
                print("step 1 \r", end="")
    finally:
        sys.stdout = real
    assert out.getvalue() == "Error executing job with overrides: ['data.password=***']\nstep 1 \r"


def grep_tree(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    return sorted(p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())
