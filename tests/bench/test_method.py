"""gd.bench.method: overrides that hydra reads back, the grouping report against brute force, the per-seed summary,
config checks, and a tiny benchmark end to end (resumed: finished runs are not redone)."""
from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from gd.bench import method
from gd.data.embedders import l2_normalize


def test_overrides_read_back_by_hydra_as_the_same_values():
    """Catches quoting bugs: lists, slashes, null, booleans, floats and strings with spaces or quotes must compose to
    the values they came from (a wrong one would silently train another model than the table says)."""
    from gd.train.__main__ import compose_config

    settings = {"model": {"name": "SiT-S/4", "hidden_size": 96, "group_layers": None},
                "train": {"lr": 1.0e-3, "compile": False, "betas": [0.9, 0.95]},
                "sample": {"cfg_interval": [0.25, 0.75], "diffusion_form": "SBDM"},
                "run": {"name": "it's a b=c"}}
    cfg = compose_config([f"++{o}" for o in method.flatten(settings)])
    assert cfg.model.name == "SiT-S/4" and cfg.model.hidden_size == 96 and cfg.model.group_layers is None
    assert cfg.train.lr == 1.0e-3 and cfg.train.compile is False and list(cfg.train.betas) == [0.9, 0.95]
    assert list(cfg.sample.cfg_interval) == [0.25, 0.75] and cfg.sample.diffusion_form == "SBDM"
    assert cfg.run.name == "it's a b=c"


def _brute_force(emb: np.ndarray, labels: np.ndarray, k: int, tau: float, n: int) -> tuple[list[int], float]:
    """Neighbour-count histogram and mean partner purity, written out: float64 cosines, sorted by hand, every
    (N-1)-subset of the passing neighbours equally likely, else the first N-1."""
    hist, purity = [0] * (k + 1), []
    x = emb.astype(np.float64)
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: -float(x[i] @ x[j]))[:k]
        passing = [j for j in others if float(x[i] @ x[j]) >= tau]
        hist[len(passing)] += 1
        same = [float(labels[j] == labels[i]) for j in others]
        if len(passing) >= n - 1:
            purity.append(np.mean([np.mean([same[j] for j in s]) for s in combinations(range(len(passing)), n - 1)]))
        else:
            purity.append(np.mean(same[:n - 1]))
    return hist, float(np.mean(purity))


def test_grouping_report_matches_brute_force():
    """The tau calibration (histogram, fallback rate, class purity of partners) against a hand-written float64
    reference on clustered points. Catches purity over the wrong candidates, a histogram counting padding, or a
    fallback rate measured at the wrong N."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 12)
    centres = rng.standard_normal((4, 6))
    emb = l2_normalize(centres[labels] + 0.9 * rng.standard_normal((48, 6)))
    rows = method.grouping_report(emb, labels, k=5, taus=[0.3, 0.6], group_sizes=[2, 4])
    for row in rows:
        for n in (2, 4):
            hist, purity = _brute_force(emb, labels, 5, row["tau"], n)
            assert row["neighbour_count_hist"] == hist
            assert row[f"class_purity_n{n}"] == pytest.approx(purity, abs=1e-9)
            assert row[f"fallback_rate_n{n}"] == pytest.approx(sum(hist[:n - 1]) / 48)
    assert rows[0]["class_purity_n4"] > 0.25                  # clusters: better than chance


def test_summary_means_sds_and_paired_differences():
    """FID mean and sample sd over seeds, and the difference to plain SiT paired by seed (not by position).
    Catches a population sd (ddof 0), pairing by list order, or a baseline diffed against itself."""
    cfg = method.compose_method(["bench.configs=[plain,sim4]"])
    rows = [{"config": "plain", "seed": 0, "fid": 10.0}, {"config": "plain", "seed": 1, "fid": 14.0},
            {"config": "sim4", "seed": 1, "fid": 11.0, "s_cross": 0.2}, {"config": "sim4", "seed": 0, "fid": 8.0,
                                                                       "s_cross": 0.4}]
    rows = [{"grouping": method.kind(cfg, r["config"]), **r} for r in rows]
    summary = {s["config"]: s for s in method.summarize(cfg, rows)}
    assert summary["plain"]["fid"] == 12.0 and summary["plain"]["fid_sd"] == pytest.approx(math.sqrt(8.0))
    assert "fid_minus_plain" not in summary["plain"]
    assert summary["sim4"]["fid_minus_plain"] == pytest.approx(-2.5)            # (8-10 + 11-14) / 2
    assert summary["sim4"]["fid_minus_plain_sd"] == pytest.approx(math.sqrt(0.5))
    assert summary["sim4"]["s_cross"] == pytest.approx(0.3) and summary["sim4"]["grouping"] == "similarity"
    table = method.markdown_table(list(summary.values()), "FID (test)")
    assert "| similarity, N=4 | 9.5 ± 2.1 |" in table and "30.0 ± 14.1%" in table


def test_report_only_plans_just_the_scored_runs_whole_seeds_first(tmp_path: Path):
    """Catches a report that retrains what is missing, counts a trained but unscored run, or an order that is not
    whole seeds first (a cut-short bench would then have no complete seed)."""
    args = [f"bench.dir={tmp_path}", "bench.configs=[plain,sim4,class4]", "bench.seeds=[0,1]"]
    assert method.planned_runs(method.compose_method(args)) == [("plain", 0), ("sim4", 0), ("class4", 0),
                                                                 ("plain", 1), ("sim4", 1), ("class4", 1)]
    report = method.compose_method([*args, "bench.report_only=true"])
    with pytest.raises(ValueError, match="no run of .* has been scored"):
        method.planned_runs(report)
    for name in ("class4_s0", "plain_s1", "sim4_s1"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "eval.json").write_text("{}")
    (tmp_path / "runs" / "sim4_s0").mkdir()
    (tmp_path / "runs" / "sim4_s0" / "ema.pt").write_text("")          # trained, not scored
    assert method.planned_runs(report) == [("class4", 0), ("plain", 1), ("sim4", 1)]


def test_previous_results_count_as_scored_only_with_the_same_settings(tmp_path: Path):
    """Catches a bench that retrains runs an earlier results.json already scored, that takes a run scored with other
    settings (another model width) into its table, or that prefers an old result to one scored in its own folder."""
    args = [f"bench.dir={tmp_path / 'now'}", "bench.configs=[plain,sim4]", "bench.seeds=[0,1]"]
    earlier = method.compose_method([f"bench.dir={tmp_path / 'then'}", "bench.configs=[plain,sim4,class4]",
                                     "bench.seeds=[0]", "bench.parallel=2"])
    rows = [{"config": n, "seed": 0, "fid": f, "run_dir": f"then/{n}_s0"}
            for n, f in (("plain", 120.0), ("sim4", 125.0), ("class4", 127.0))]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"bench": OmegaConf.to_container(earlier.bench, resolve=True), "runs": rows}))
    cfg = method.compose_method([*args, f"bench.previous=[{results}]"])
    assert {k: r["fid"] for k, r in method.previous_rows(cfg).items()} == {("plain", 0): 120.0, ("sim4", 0): 125.0}
    report = method.compose_method([*args, f"bench.previous=[{results}]", "bench.report_only=true"])
    assert method.planned_runs(report) == [("plain", 0), ("sim4", 0)]
    (tmp_path / "now" / "runs" / "sim4_s0").mkdir(parents=True)
    (tmp_path / "now" / "runs" / "sim4_s0" / "eval.json").write_text("{}")
    assert list(method.previous_rows(cfg)) == [("plain", 0)]
    wider = method.compose_method([*args, f"bench.previous=[{results}]", "bench.run.model.hidden_size=256"])
    with pytest.raises(ValueError, match=r"scored plain seed 0 with other settings \(run.model.hidden_size: 128 "
                                         r"there, 256 here\)"):
        method.previous_rows(wider)
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        method.previous_rows(method.compose_method([*args, f"bench.previous=[{tmp_path / 'nope.json'}]"]))


def test_bad_benchmark_configs_are_refused_naming_the_value():
    with pytest.raises(ValueError) as err:
        method.check_bench(method.compose_method(["bench.variants.sim8.group_size=16",
                                                  "bench.configs=[plain,nope,sim8]"]))
    assert "'nope'" in str(err.value) and "group_size=16 exceeds the n_max=8" in str(err.value)
    with pytest.raises(ValueError, match="plain SiT has group_size 1"):
        method.check_bench(method.compose_method(["bench.variants.plain.group_size=2"]))


TINY = ["bench.train_images=200", "bench.ref_images=20", "bench.seeds=[0]", "bench.configs=[plain,random2]",
        "+bench.variants.random2={label: 'random, N=2', diffusion: groupdiff_l, grouping: random, group_size: 2}",
        "bench.build.chunk_size=128", "bench.run.model.hidden_size=32", "bench.run.model.depth=2",
        "bench.run.model.num_heads=2", "bench.run.train.global_batch=16", "bench.run.train.micro_batch=16",
        "bench.run.train.steps=6", "bench.run.train.log_every=2", "bench.run.train.ckpt_every=3",
        "bench.run.train.s_cross_every=3", "bench.null_rate=0.5", "bench.run.sample.num_images=20",
        "bench.run.sample.steps=3", "bench.sample_batch=20", "bench.threads=1"]


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_then_resumed(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    """The real commands (build_shards, gd.train, gd.evaluate) for plain SiT and GroupDiff-l N=2: a table, a plot and
    results with a finite FID and an S_cross for the grouped run only; a second call redoes nothing (its logs do not
    grow); a run folder made with other settings is refused before anything trains. A bench with
    ``bench.checkpoints_from`` scores the first bench's very checkpoints (same sha256) at another CFG scale, trains
    nothing, and refuses a source trained otherwise or missing."""
    args = [*TINY, f"bench.dir={tmp_path / 'bench'}", f"bench.shards_dir={tmp_path / 'shards'}"]
    try:
        result = method.run(method.compose_method(args))
        rows = {r["config"]: r for r in result["runs"]}
        assert math.isfinite(rows["plain"]["fid"]) and rows["plain"]["s_cross"] is None
        assert rows["random2"]["s_cross"] is not None and rows["random2"]["steps"] == 6
        for name in ("results.json", "table.md", "method.png", "grouping.json"):
            assert (tmp_path / "bench" / name).stat().st_size > 0
        assert "random, N=2" in (tmp_path / "bench" / "table.md").read_text()
        random = json.loads((tmp_path / "bench" / "grouping.json").read_text())["random"]["by_tau"][0]
        assert random["class_purity_n2"] < 0.5                  # random partners: ~1 in 10 share the class

        logs = sorted((tmp_path / "bench" / "runs").glob("*/bench_*.log"))
        sizes = [p.stat().st_size for p in logs]
        again = method.run(method.compose_method(args))
        assert [p.stat().st_size for p in logs] == sizes
        assert [r["fid"] for r in again["runs"]] == [r["fid"] for r in result["runs"]]

        with pytest.raises(ValueError, match="made with other settings"):
            method.run(method.compose_method([*args, "bench.run.train.steps=8"]))

        cfg1 = [*TINY, f"bench.dir={tmp_path / 'cfg1'}", f"bench.shards_dir={tmp_path / 'shards'}",
                f"bench.checkpoints_from={tmp_path / 'bench'}", "bench.run.sample.cfg_scale=1.0"]
        rescored = {r["config"]: r for r in method.run(method.compose_method(cfg1))["runs"]}
        for name, row in rows.items():
            ev = json.loads((tmp_path / "cfg1" / "runs" / f"{name}_s0" / "eval.json").read_text())
            source = tmp_path / "bench" / "runs" / f"{name}_s0" / "ema.pt"
            assert Path(ev["ckpt"]).resolve() == source.resolve()
            assert ev["ckpt_sha256"] == json.loads(Path(row["run_dir"], "eval.json").read_text())["ckpt_sha256"]
            assert rescored[name]["trained_in"] == str(source.parent) and "train_s" not in rescored[name]
            assert rescored[name]["s_cross"] == row["s_cross"]
        assert not list((tmp_path / "cfg1" / "runs").glob("*/bench_train.log"))
        with pytest.raises(ValueError, match=r"trained with other settings \(.*train.lr"):
            method.run(method.compose_method([*cfg1, f"bench.dir={tmp_path / 'lr'}", "bench.run.train.lr=0.01"]))
        with pytest.raises(FileNotFoundError, match="sim4 seed 0 has no trained run"):
            method.run(method.compose_method([*cfg1, "bench.configs=[plain,sim4]"]))
    finally:
        from tests.fixtures.shm import clean_streaming_shm

        clean_streaming_shm(tmp_path)


FINETUNE = [*TINY, "bench.mode=finetune", "bench.finetune.configs=[plain,random2]", "bench.finetune.seeds=[0]",
            "bench.finetune.probe_pool=64",
            "bench.finetune.base.run.train.steps=4", "bench.finetune.base.run.train.ckpt_every=2",
            "bench.finetune.run.train.steps=4", "bench.finetune.run.train.ckpt_every=2",
            "bench.finetune.run.train.probe_every=2", "bench.finetune.run.train.probe_images=8"]


@pytest.mark.slow
def test_tiny_finetune_benchmark_builds_the_base_once(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    """bench.mode=finetune end to end with the real commands: the base (plain SiT, no sample embedding) is trained
    and scored once; every fine-tune's trainer config has train.init_from = the base's ema.pt; its metrics.jsonl has
    the held-out probes every probe_every steps (member selectivity for the grouped run); the GroupDiff run is scored
    grouped and alone from the same checkpoint and seed. A second call trains nothing (the base's sha256 and every log
    unchanged); a bench whose base has other settings names another base folder and refuses the fine-tune folders made
    from the first one before it builds anything."""
    from gd.train.__main__ import compose_config

    args = [*FINETUNE, f"bench.dir={tmp_path / 'bench'}", f"bench.shards_dir={tmp_path / 'shards'}"]
    try:
        result = method.run(method.compose_method(args))
        base = Path(result["base"]["dir"])
        assert base.parent == tmp_path / "shards" / "base" and math.isfinite(result["base"]["fid"])
        assert result["base"]["steps"] == 4 and result["base"]["loss_curve"]
        assert compose_config(json.loads((base / "bench_base.json").read_text())["overrides"]).model.sample_embed \
            == "none"
        out = tmp_path / "bench_finetune"                        # bench.finetune.dir: bench.dir + _finetune
        rows = {r["config"]: r for r in result["runs"]}
        assert set(rows) == {"plain", "random2"}
        for name, row in rows.items():
            run_dir = out / "runs" / f"{name}_s0"
            trained = OmegaConf.load(run_dir / "config.yaml")
            assert Path(trained.train.init_from) == base / "ema.pt"
            assert trained.train.probe_data == str(method.probe_root(method.resolve_mode(method.compose_method(args))))
            probes = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            probes = [r for r in probes if "probe_loss_cond" in r]
            assert [r["step"] for r in probes] == [2, 4] and row["steps"] == 4
            assert [p["step"] for p in row["probes"]] == [2, 4]
        grouped = rows["random2"]
        for key in ("probe_own_class", "probe_own_random", "probe_loss_random_minus_alone"):
            assert all(key in p for p in grouped["probes"])
        assert grouped["probes"][-1]["probe_own_uniform"] == pytest.approx(0.5)
        assert "fid_alone" not in rows["plain"]
        ev = {k: json.loads((out / "runs" / "random2_s0" / f).read_text())
              for k, f in (("grouped", "eval.json"), ("alone", "eval_alone.json"))}
        assert ev["grouped"]["ckpt_sha256"] == ev["alone"]["ckpt_sha256"]
        assert (ev["grouped"]["sampler"]["group_size"], ev["alone"]["sampler"]["group_size"]) == (2, 1)
        assert ev["grouped"]["sampler"]["seed"] == ev["alone"]["sampler"]["seed"]
        assert grouped["fid_alone"] == pytest.approx(ev["alone"]["fid"])
        assert grouped["fid_grouped_minus_alone"] == pytest.approx(ev["grouped"]["fid"] - ev["alone"]["fid"])
        for name in ("results.json", "table.md", "method.png", "selectivity.png"):
            assert (out / name).stat().st_size > 0
        assert "random, N=2" in (out / "table.md").read_text()

        logs = sorted([*base.glob("bench_*.log"), *(out / "runs").glob("*/bench_*.log")])
        sizes = [p.stat().st_size for p in logs]
        again = method.run(method.compose_method(args))
        assert again["base"]["ema_sha256"] == result["base"]["ema_sha256"] == method.sha256(base / "ema.pt")
        assert [p.stat().st_size for p in logs] == sizes
        assert [r["fid"] for r in again["runs"]] == [r["fid"] for r in result["runs"]]

        other = [*args, "++bench.finetune.base.run.train.lr=0.002"]
        assert method.base_dir(method.resolve_mode(method.compose_method(other))) != base
        with pytest.raises(ValueError, match=r"made with other settings \(.*train.init_from"):
            method.run(method.compose_method(other))
        assert sorted(p.name for p in (tmp_path / "shards" / "base").iterdir()) == [base.name]
    finally:
        from tests.fixtures.shm import clean_streaming_shm

        clean_streaming_shm(tmp_path)


def test_finetune_mode_resolution_and_its_refusals():
    """The fine-tune bench's settings: its own folder, configurations and null rate, bench.run with the fine-tune
    and the base settings on top, and a base key that changes with a training setting but not with a sampler one.
    Catches a base rebuilt for another CFG scale, or a fine-tune that inherits the base's step count."""
    cfg = method.resolve_mode(method.compose_method(["bench.mode=finetune", "bench.dir=/x/b"]))
    b = cfg.bench
    assert b.dir == "/x/b_finetune" and list(b.configs) == ["plain", "class4", "sim2", "sim4", "random4"]
    assert b.null_rate == 0.5 and list(b.seeds) == [0]
    assert b.run.train.steps == 2000 and b.run.train.probe_every == 100
    assert b.finetune.base.run.train.steps == 8000 and b.finetune.base.run.model.name == b.run.model.name
    assert method.resolve_mode(cfg) == cfg                    # resolving twice changes nothing
    assert "++train.init_from=" + str(method.base_dir(cfg) / "ema.pt") in method.run_overrides(cfg, "sim4", 0,
                                                                                              Path("/s"))
    assert "++model.sample_embed=none" in method.run_overrides(cfg, "plain", 0, Path("/s"))
    assert "++model.sample_embed=none" not in method.run_overrides(cfg, "sim4", 0, Path("/s"))
    cfg_scale = method.resolve_mode(method.compose_method(["bench.mode=finetune", "bench.run.sample.cfg_scale=1.0"]))
    assert method.base_dir(cfg_scale) == method.base_dir(method.resolve_mode(method.compose_method(
        ["bench.mode=finetune"])))
    longer = method.resolve_mode(method.compose_method(["bench.mode=finetune",
                                                        "bench.finetune.base.run.train.steps=7000"]))
    assert method.base_dir(longer) != method.base_dir(cfg_scale)
    with pytest.raises(ValueError, match="bench.mode='fine': expected one of"):
        method.resolve_mode(method.compose_method(["bench.mode=fine"]))
    with pytest.raises(ValueError, match="needs a plain SiT baseline"):
        method.check_bench(method.resolve_mode(method.compose_method(["bench.mode=finetune",
                                                                      "bench.baseline=sim4"])))


def test_every_configuration_sees_the_same_images_and_null_label_rate():
    """The composed run configs of plain SiT and each GroupDiff-l variant: equal steps x batch and, counted over
    2,000 planned micro-batches, the same share of null labels (plain: dropped per image; GroupDiff-l: whole group
    micro-batches, no conditional label dropped). Catches a benchmark that gives GroupDiff-l 19% null labels (class
    dropout left on) or more images."""
    import torch

    from gd.diffusion.plan import BatchPlan
    from gd.train.__main__ import compose_config

    bench = method.compose_method([])
    seen, null = {}, {}
    for name in bench.bench.configs:
        cfg = compose_config(method.run_overrides(bench, name, 0, Path("/nonexistent")))
        plan = BatchPlan.from_config(cfg.diffusion, cfg.model, 0, 1)
        y = torch.zeros(int(cfg.train.micro_batch), dtype=torch.long)
        nulls = sum(int((plan.labels(step, y, rank=0, micro=0) == cfg.model.num_classes).sum()) for step in range(2000))
        seen[name] = int(cfg.train.steps) * int(cfg.train.global_batch)
        null[name] = nulls / (2000 * len(y))
        if name != "plain":
            assert cfg.diffusion.class_dropout == 0.0 and cfg.diffusion.group_size == cfg.model.max_group_size
    assert len(set(seen.values())) == 1
    assert null["plain"] == pytest.approx(0.1, abs=0.01)
    for name, rate in null.items():
        assert rate == pytest.approx(null["plain"], abs=0.01), null
