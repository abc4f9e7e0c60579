"""gd.bench.group_parallel without spawning: the printed tables, and the measured activation constants."""
from __future__ import annotations

import pytest

from gd.bench.group_parallel import activation_elements, main


def test_tables_print_every_degree_and_size(capsys):
    """The tables have one bytes row per (P, impl) with Ulysses below all-gather from P=4 on, and one cost row
    per N; at N=12, P=3 (not dividing SiT-XL/2's 16 heads) is reported as Ulysses' refusal while all-gather
    runs, and P=8 (not dividing N) as a refusal of both. Catches a table that breaks on a P that does not divide
    N or H."""
    assert main(["time.enabled=false", "group_size=12", "degrees=[1,2,3,4,8]", "sizes=[1,4,64]"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in out.splitlines() if line.startswith("| ")}
    assert "num_heads=16 is not divisible by group_parallel P=3" in rows[("3", "ulysses")]
    mib = {key: float(line.split("|")[3]) for key, line in rows.items() if key[1] in ("ulysses", "allgather")
           and "divisible" not in line}
    assert mib[("2", "ulysses")] == mib[("2", "allgather")] > 0
    assert mib[("4", "ulysses")] * 2 == pytest.approx(mib[("4", "allgather")], abs=0.02)  # printed to 0.01 MiB
    assert mib[("3", "allgather")] > 0
    assert "group_size N=12 is not divisible by group_parallel P=8" in rows[("8", "allgather")]
    assert {key[0] for key in rows if key[1].isdigit()} == {"1", "4", "64"}


def test_activation_constants_are_per_token():
    """e_block (elements kept per token per unit of width per block) is about 20 and the same at two widths: a
    count that included the weights, or an N*L x N*L attention matrix, would grow with the width or the tokens."""
    e0, e_block = activation_elements(2, width=32)
    e0_wide, e_block_wide = activation_elements(2, width=64)
    assert 15 < e_block < 25 and 0 < e0 < 8
    assert abs(e_block - e_block_wide) < 0.5
