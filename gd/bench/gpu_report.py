"""gpu_check.json as markdown: a status table of the parts, then one section per part, and the trainer's goals."""
from __future__ import annotations

import math
from typing import Any

# Goals for the trainer's step on one H200 (SiT-XL/2, batch 32): at N=1, at least GOAL_VS_PLAIN_N1 of the plain torch
# step's img/s (same compile) and at least GOAL_IPS_N1 img/s; at N=16, GOAL_MFU_N16 MFU and at most GOAL_GIB_N16 peak.
GOAL_VS_PLAIN_N1 = 0.95
GOAL_IPS_N1 = 550.0
GOAL_MFU_N16 = 0.50
GOAL_GIB_N16 = 40.0
OFFICIAL = ("For comparison, the official SiT code measured earlier on one H200, SiT-XL/2 batch 32: "
            "fp32+TF32 172.5 img/s, bf16 292-305, bf16 + torch.compile 437; N=16 group reshape 219, compiled 275.")


def _num(value: Any, fmt: str = ".1f") -> str:
    """``value`` formatted (a trailing ``%`` in ``fmt`` is printed as is), or a dash when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt[:-1]) + "%" if fmt.endswith("%") else format(value, fmt)


def render(report: dict[str, Any]) -> str:
    """The whole report; parts not run yet show as pending."""
    m = report["machine"]
    peak = (report["parts"].get("peak") or {}).get("result") or {}
    v = m.get("versions", {})
    lines = [f"# GPU check{' (dry run, CPU)' if report.get('dry_run') else ''}: {peak.get('device', '?')}",
             "",
             f"started {report['started']}, wall {_num(report.get('wall_s'), '.0f')} s of a {report['budget_s']:.0f} s "
             f"budget; Python {m['python']}, torch {v.get('torch')} (CUDA {peak.get('cuda')}), DeepSpeed "
             f"{v.get('deepspeed')}, {m['cpus']} CPUs", "",
             "| part | status | wall s | budget s | note |", "|---|---|---|---|---|"]
    for name, part in report["parts"].items():
        note = part.get("reason") or part.get("error") or ""
        lines.append(f"| {name} | {part['status']} | {_num(part.get('wall_s'), '.0f')} | "
                     f"{_num(part.get('budget_s'), '.0f')} | {note[:300].replace('|', '/')} |")
    for name, section in (("peak", _peak), ("tests", _tests), ("train", _train), ("attention", _attention),
                          ("sampling", _sampling), ("xformers", _xformers)):
        part = report["parts"].get(name)
        if part and part.get("result"):
            lines += ["", *section(part["result"], peak)]
    return "\n".join(lines) + "\n"


def _peak(r: dict, peak: dict) -> list[str]:
    sheet = f" (datasheet {r['datasheet_tflops']:.0f})" if r.get("datasheet_tflops") else ""
    return ["## Peak", "", f"{r['dtype']} {r['size']}³ matmul on random data: **{r['matmul_tflops']:.4g} TFLOP/s**"
            f"{sheet}, the MFU denominator below; device-to-device copy {r['copy_gb_s']:.0f} GB/s (read + write)."]


def _tests(r: dict, peak: dict) -> list[str]:
    out = ["## Tests (`pytest -m gpu`)", "",
           f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('errors', 0)} errors, "
           f"{r.get('skipped', 0)} skipped in {', '.join(r.get('files', []))}"]
    out += [f"- {c['outcome']}: `{c['name']}` {c['message'][:200]}" for c in r.get("cases", [])
            if c["outcome"] != "passed"]
    return out


def _train(r: dict, peak: dict) -> list[str]:
    rows = r.get("rows", [])
    out = ["## Training step: plain torch vs the trainer", "",
           f"{r.get('model')}, batch {r.get('batch')}, {r.get('steps')} timed steps after {r.get('warmup')} warm-up; "
           f"MFU against {r.get('peak_tflops', math.nan):.4g} TFLOP/s. 'vs plain': img/s over the plain step's at "
           "the same N, compile and overrides. Warm-up s includes compilation.", "",
           "| N | step | compile | extra | img/s | TFLOP/s | MFU | peak GiB | vs plain | warm-up s | wall s | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = next((x for x in rows if x["mode"] == "reference" and x["n"] == row["n"]
                    and x["compile"] == row["compile"] and x.get("overrides") == row.get("overrides")), None)
        rel = row.get("ips", math.nan) / ref["ips"] if ref and ref.get("ips") else math.nan
        name = "plain torch" if row["mode"] == "reference" else f"trainer {row['variant']}"
        extra = " ".join(row.get("overrides", []))
        out.append(f"| {row['n']} | {name} | {'yes' if row['compile'] else 'no'} | {extra} | {_num(row.get('ips'))}"
                   f" | {_num(row.get('tflops'))} | {_num(_pct(row.get('mfu')))} | "
                   f"{_num(row.get('mem'))} | {_num(rel, '.2f')} | {_num(row.get('warmup_s'), '.0f')} | "
                   f"{_num(row.get('wall_s'), '.0f')} | {row.get('error', '')[:160]} |")
    out += _skips(r)
    out += ["", _goals(rows), "", OFFICIAL]
    return out


def _pct(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else 100.0 * value


def _goals(rows: list[dict]) -> str:
    """The trainer's goals against the best trainer row that measured them; N=1 beside the plain step is the best
    trainer row's img/s over the plain step's at the same compile."""
    engine = [r for r in rows if r["mode"] == "engine" and not r.get("error") and not r.get("overrides")]
    n1 = max((r["ips"] for r in engine if r["n"] == 1), default=math.nan)
    plain = {r["compile"]: r["ips"] for r in rows if r["mode"] == "reference" and r["n"] == 1 and not r.get("error")
             and not r.get("overrides") and r.get("ips")}
    vs_plain = max((r["ips"] / plain[r["compile"]] for r in engine if r["n"] == 1 and r["compile"] in plain),
                   default=math.nan)
    n16 = [r for r in engine if r["n"] == 16]
    mfu = max((r["mfu"] for r in n16), default=math.nan)
    mem = min((r["mem"] for r in n16), default=math.nan)

    def verdict(ok: bool, measured: float) -> str:
        return "not measured" if math.isnan(measured) else ("met" if ok else "not met")

    return (f"Goals (trainer rows): N=1 ≥ {GOAL_VS_PLAIN_N1:.2f}x the plain step's img/s at the same compile: best "
            f"{_num(vs_plain, '.2f')}x ({verdict(vs_plain >= GOAL_VS_PLAIN_N1, vs_plain)}); "
            f"N=1 ≥ {GOAL_IPS_N1:.0f} img/s: best {_num(n1)} "
            f"({verdict(n1 >= GOAL_IPS_N1, n1)}); N=16 ≥ {GOAL_MFU_N16:.0%} MFU: best {_num(_pct(mfu), '.1f%')} "
            f"({verdict(mfu >= GOAL_MFU_N16, mfu)}); "
            f"N=16 peak ≤ {GOAL_GIB_N16:.0f} GiB: lowest {_num(mem)} ({verdict(mem <= GOAL_GIB_N16, mem)}).")


def _skips(r: dict) -> list[str]:
    skipped = r.get("skipped", [])
    if not skipped:
        return []
    out = ["", "Not run:"]
    for s in skipped:
        what = ", ".join(f"{k}={'all' if s[k] is None else s[k]}" for k in s
                         if k not in ("reason", "set") and s[k] not in ([], ""))
        out.append(f"- {what}: {s['reason']}")
    return out


def _attention(r: dict, peak: dict) -> list[str]:
    out = ["## Group-attention cost", "",
           f"{r.get('model')}, eager, {r.get('precision')}: ms per training step (fwd+bwd, batch {r.get('batch')}) and "
           f"per sampling forward (batch {r.get('sample_batch')}). With a t window: the cost inside and outside it "
           "(and, for training, with groups on both sides, when eager runs both attentions), combined for t uniform "
           "on [0, 1].", "",
           "| group layers | t window | N | train ms | sampling fwd ms | train ms in / out / mixed | "
           "sampling ms in / out |", "|---|---|---|---|---|---|---|"]
    for row in r.get("rows", []):
        split_t = "/".join(_num(row.get(k)) for k in ("train_ms_inside", "train_ms_outside", "train_ms_mixed"))
        split_s = "/".join(_num(row.get(k)) for k in ("sample_ms_inside", "sample_ms_outside"))
        layers, window = layers_label(row["group_layers"]), window_label(row["group_t_window"])
        out.append(f"| {layers} | {window} | {row['n']} | {_num(row.get('train_ms'))} | "
                   f"{_num(row.get('sample_ms'))} | {split_t if 'train_ms_inside' in row else ''} | "
                   f"{split_s if 'sample_ms_inside' in row else ''} |")
    return out + _skips(r)


def layers_label(layers: list[int] | None) -> str:
    if layers is None:
        return "all"
    return "none" if layers[0] == layers[1] else f"[{layers[0]}, {layers[1]})"


def window_label(window: list[float] | None) -> str:
    return "all" if window is None else f"[{window[0]:g}, {window[1]:g}]"


def _sampling(r: dict, peak: dict) -> list[str]:
    m, p = r["measured"], r["projection"]
    return ["## Sampling", "",
            f"{m.get('model')} GroupDiff-{m.get('mode')} N={m.get('group_size')}, batch {p['batch']}, "
            f"{m.get('method')}, CFG {m.get('cfg_scale')} on t ∈ {m.get('cfg_interval')}, {m.get('precision')}, "
            "model only (no VAE decode).", "",
            "| NFE/s plain | NFE/s guided | NFE/s with interval | img/s | "
            f"FID-{p['num_images'] // 1000}K GPU-hours | without interval |", "|---|---|---|---|---|---|",
            f"| {p['nfe_per_s_plain']:.2f} | {p['nfe_per_s_guided']:.2f} | {p['nfe_per_s_with_interval']:.2f} | "
            f"{p['img_per_s']:.2f} | {p['gpu_hours']:.2f} | {p['gpu_hours_no_interval']:.2f} |", "",
            f"Projected to {p['steps']} steps ({p['guided_nfe']} of {p['nfe']} NFE guided) from the per-NFE costs; "
            f"the measured {m.get('steps')}-step run: {m.get('img_per_s', math.nan):.2f} img/s."]


def _xformers(r: dict, peak: dict) -> list[str]:
    if not r.get("available"):
        return ["## xformers", "", f"Not run: {r.get('reason')}"]
    out = ["## xformers", "", "| backend | N | img/s | ms/step | MFU | peak GiB | error |",
           "|---|---|---|---|---|---|---|"]
    for row in r.get("rows", []):
        out.append(f"| {row['backend']} | {row['group_size']} | {_num(row.get('img_per_s'))} | "
                   f"{_num(1e3 * row['step_s'] if 'step_s' in row else None)} | {_num(_pct(row.get('mfu')))} | "
                   f"{_num(row.get('peak_mem_gib'))} | {row.get('error', '')[:160]} |")
    return out + _skips(r)
