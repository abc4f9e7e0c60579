"""Entry points answer --help from a checkout (``python -m``; gd.sample and gd.evaluate, whose imports take seconds,
only as console scripts of the installed wheel in tests/test_packaging.py, which runs all five), and gd.train takes
the flags its launchers pass: --cfg job, --resolve, --local_rank."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELP = [
    (["-m", "gd.launch", "--help"], "gd-launch -m +cluster=slurm"),
    (["-m", "gd.launch", "status", "--help"], "usage: gd-launch status"),
    (["-m", "gd.train", "--help"], "deepspeed --num_gpus 8 --module gd.train"),
    (["-m", "gd.build_shards", "--help"], "gd-build-shards"),
    ([str(REPO / "tools" / "build_shards.py"), "--help"], "gd-build-shards"),
]


@pytest.mark.parametrize("args,needle", HELP, ids=[" ".join(a[:3]) for a, _ in HELP])
def test_help(args, needle, tmp_path):
    """Catches an entry point whose --help fails or is taken for an override (gd.train used to compose "--help"
    as a config key and print a traceback) and one that writes files (hydra's output dirs) when asked for help."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert needle in out.stdout and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_cfg_job_prints_the_composed_config_redacted(capsys, monkeypatch):
    """``--cfg job`` prints the config the overrides compose to and trains nothing; resolved (``--resolve``) a
    credential read from the environment is redacted. Catches --cfg taken as an override, or printed raw."""
    from gd.train.__main__ import main

    monkeypatch.setenv("GD_TEST_API_TOKEN", "tok3nThatMustNotPrint12")
    assert main(["--cfg", "job", "+exp=demo", "+train.deepspeed.api_token=${oc.env:GD_TEST_API_TOKEN}"]) == 0
    out = capsys.readouterr().out
    assert "name: SiT-S/4" in out and "api_token: ${oc.env:GD_TEST_API_TOKEN}" in out
    assert main(["--cfg=job", "--resolve", "+exp=demo", "+train.deepspeed.api_token=${oc.env:GD_TEST_API_TOKEN}"]) == 0
    out = capsys.readouterr().out
    assert "api_token: '***'" in out and "tok3nThatMustNotPrint12" not in out


@pytest.mark.parametrize("argv,rank", [(["--local_rank=3", "a=1"], 3), (["--local_rank", "2", "a=1"], 2),
                                       (["--local-rank=1", "a=1"], 1), (["a=1"], None)])
def test_train_accepts_the_local_rank_flag(argv, rank):
    """DeepSpeed's launcher (and torch.distributed.launch) put ``--local_rank`` before the overrides: it is read,
    not composed as an override (tests/train/test_launchers.py runs the real launcher)."""
    from gd.train.__main__ import parse_args

    args = parse_args(argv)
    assert args.local_rank == rank and args.overrides == ["a=1"]


def test_train_refuses_unknown_flags(capsys):
    from gd.train.__main__ import main

    assert main(["--bogus", "a=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag '--bogus'" in err and "usage: python -m gd.train" in err


@pytest.mark.parametrize("module,args,key", [
    ("gd.launch", ["+cluster=local", "+exp=demo", "+train.micro_bach=16"], "train.micro_bach"),
    ("gd.train", ["+train.micro_bach=16", "--cfg", "job"], "train.micro_bach"),
    ("gd.evaluate", ["+metrics.refrence=x.npz", "ckpt=absent.pt"], "metrics.refrence"),
    ("gd.build_shards", ["+cluster=slurm", "out=absent"], "cluster"),
])
def test_a_plus_key_no_conf_file_declares_is_refused(module, args, key, tmp_path):
    """Before: `+train.micro_bach=16` (a typo, with the `+` hydra suggests) was accepted and ignored (rc 0), and so was
    `gd-build-shards +cluster=slurm`, which then ran locally."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"gd.{module.split('.')[1]}: unknown key {key} " in done.stderr, done.stderr[-2000:]
    if key == "train.micro_bach":
        assert "did you mean train.micro_batch?" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_plus_key_under_an_open_mapping_is_accepted():
    from gd.config import compose_config, unknown_appends

    overrides = ["+cluster=slurm", "+cluster.env.NCCL_IB_DISABLE=1", "+train.deepspeed.wall_clock_breakdown=true",
                 "+exp=demo"]
    assert unknown_appends(overrides, compose_config(overrides)) == []
    bad = ["+cluster=slurm", "+cluster.partiton=gpu"]
    assert unknown_appends(bad, compose_config(bad)) == [
        "unknown key cluster.partiton (+cluster.partiton=...): no conf/ file declares it, so nothing would read it; "
        "did you mean cluster.partition? (a '+' adds a config group or a key under an open mapping such as "
        "cluster.env)"]


def test_evaluate_without_its_reference_says_where_to_get_it_in_one_line(tmp_path):
    """Before: a hydra traceback after the model was built, with no hint where the ADM reference batch comes from."""
    done = subprocess.run([sys.executable, "-m", "gd.evaluate", "+exp=demo", f"ckpt={tmp_path / 'ema.pt'}",
                           f"metrics.reference={tmp_path / 'VIRTUAL_imagenet256_labeled.npz'}"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "VIRTUAL_imagenet256_labeled.npz' does not exist: it is ADM's reference batch" in lines[0]
    assert "openai/guided-diffusion" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_build_shards_refuses_a_missing_image_folder_before_its_imports(tmp_path):
    """Before: ~45 s of imports (streaming pulls in transformers), then a traceback."""
    done = subprocess.run([sys.executable, "-m", "gd.build_shards", "source=folder",
                           f"sources.folder.root={tmp_path / 'imagenet'}", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip() == (f"gd.build_shards: sources.folder.root={tmp_path / 'imagenet'}: no such folder; "
                                   "expected an ImageNet-style <root>/<class>/<image> tree (e.g. "
                                   "sources.folder.root=/data/imagenet/train)")
    assert list(tmp_path.iterdir()) == []
