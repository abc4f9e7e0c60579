"""gd.bench.retrieval: the exact reference it measures recall against, and a small run end to end."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from gd.bench import retrieval


def test_exact_neighbours_match_a_full_sort_with_self_excluded(tmp_path: Path) -> None:
    """Catches a running top-k that drops a neighbour at a chunk boundary, keeps the query itself, or mis-offsets
    row numbers across chunks of unequal size."""
    cfg = OmegaConf.create({**retrieval.DEFAULTS, "num": 700, "dim": 16, "classes": 5, "subclusters": 3,
                            "chunk": 250})
    chunks = retrieval.write_embeddings(tmp_path, cfg)
    assert [len(c) for c in chunks] == [250, 250, 200]
    emb = np.concatenate([np.asarray(c) for c in chunks]).astype(np.float64)
    rows = np.array([0, 249, 250, 499, 699, 313])
    got = retrieval.exact_neighbours(chunks, emb[rows].astype(np.float32), rows, k=7)
    for q, r in enumerate(rows):
        sims = emb @ emb[r]
        sims[r] = -np.inf
        want = np.argsort(-sims, kind="stable")[:7]
        assert set(got[q]) == set(want) and r not in got[q]


def test_small_ivf_run_reports_build_search_memory_and_recall(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(sys, "argv", ["retrieval", "num=6000", "dim=32", "classes=20", "subclusters=4",
                                      "chunk=2500", "sample=200", "k=8", "kind=ivf", "nlist=24", "nprobe=24",
                                      "ranks=4", f"dir={tmp_path}"])
    retrieval.main()
    out = capsys.readouterr().out
    assert "gather" in out and "train" in out and "add" in out and "peak RSS" in out
    recall = float(re.search(r"recall@8 of ivf vs exact on 200 queries: ([0-9.]+)", out).group(1))
    assert recall == pytest.approx(1.0)  # nprobe = nlist scans every list: IVF is exact
