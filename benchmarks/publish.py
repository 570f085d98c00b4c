"""Commit-ready copies of a GPU run: ``python benchmarks/publish.py OUTDIR [--table PATH]``.

* A GPU suite run (``gpu_suite.sh``: OUTDIR/bench.json): copies bench.json and bench.md to
  benchmarks/results/<date>-<gpu>.{json,md} (plots as <date>-<gpu>-*.png) and rewrites
  benchmarks/RESULTS.md with the newest run's tables.
* An offline model run (``python -m ghost_kernels.bench --offline --out OUTDIR``: OUTDIR/offline.json):
  copies it to benchmarks/results/<date>-offline-sm90[-<network>].{json,md} and writes its rows into
  the table's ``offline`` section (the predicted times behind ``backend="triton"``'s choice on
  unmeasured shapes; the rows of other runs, e.g. another network's, stay).
* A GPU lab run (``gpu_lab.sh``: OUTDIR/timing.json and the other phases' files; a call of
  ``--phases train`` or ``--phases model`` alone: its files only, no table): copies them to
  benchmarks/results/<date>-<gpu>-lab-<phase>.json, and writes the GPU's entry of the measured choice
  table (ghost_kernels/core/choice_table.json, or ``--table PATH``) from the timing rows, so that ``auto``
  and ``backend="triton"`` choose per shape by these measurements.
"""
import argparse
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAB_PHASES = ("timing", "references", "precompile", "ncu", "model", "train", "phases")
DEFAULT_TABLE = os.path.join(ROOT, "ghost_kernels", "core", "choice_table.json")   # choice.TABLE_PATH


def _stem(data: dict, suffix: str = "") -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", data["device"].lower()).strip("-")
    return f"{data['date']}-{slug}" + ("-quick" if data.get("quick") else "") + suffix


def publish_suite(out_dir: str) -> str:
    with open(os.path.join(out_dir, "bench.json")) as f:
        data = json.load(f)
    stem = _stem(data)
    results = os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    shutil.copy(os.path.join(out_dir, "bench.json"), os.path.join(results, stem + ".json"))
    shutil.copy(os.path.join(out_dir, "bench.md"), os.path.join(results, stem + ".md"))
    for png in ("speedup.png", "bandwidth.png"):
        if os.path.exists(os.path.join(out_dir, png)):
            shutil.copy(os.path.join(out_dir, png), os.path.join(results, f"{stem}-{png}"))
    with open(os.path.join(out_dir, "bench.md")) as f:
        body = f.read()
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("<!-- written by benchmarks/publish.py from the newest GPU suite run -->\n"
                f"Latest GPU results: `results/{stem}.json` (all runs are in `results/`).\n"
                f"Card {data['device']}, driver {data.get('driver')}, torch {data['torch']}, triton {data['triton']}, "
                f"CUDA {data['cuda']}, {data['date']}.\n\n"
                f"![speedup](results/{stem}-speedup.png)\n![bandwidth](results/{stem}-bandwidth.png)\n\n" + body)
    return stem


def publish_lab(out_dir: str, table_path: str, results: str) -> str:
    sys.path.insert(0, ROOT)
    from ghost_kernels import dispatch
    from ghost_kernels.core import choice

    with open(os.path.join(out_dir, "timing.json")) as f:
        timing = json.load(f)
    stem = _stem(timing, "-lab")
    os.makedirs(results, exist_ok=True)
    for phase in LAB_PHASES:
        src = os.path.join(out_dir, f"{phase}.json")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(results, f"{stem}-{phase}.json"))
    table = _load_table(table_path)
    table.setdefault("gpus", {})[timing["device"]] = choice.entry_from_rows(
        timing["rows"], timing["device"], timing.get("capability"), f"benchmarks/results/{stem}-timing.json",
        timing["date"], families=[f.name for f in dispatch.TRITON_FAMILIES])
    _write_table(table_path, table)
    return stem


def _load_table(table_path: str) -> dict:
    if os.path.exists(table_path):
        with open(table_path) as f:
            return json.load(f)
    return {"gpus": {}}


def _write_table(table_path: str, table: dict) -> None:
    table["note"] = "written by benchmarks/publish.py from GPU lab runs; do not edit by hand (ghost_kernels/choice.py)"
    with open(table_path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)


def publish_offline(out_dir: str, table_path: str, results: str) -> str:
    sys.path.insert(0, ROOT)
    from ghost_kernels.core import choice

    with open(os.path.join(out_dir, "offline.json")) as f:
        data = json.load(f)
    date = (data.get("meta") or {}).get("date") or __import__("datetime").date.today().isoformat()
    network = (data.get("meta") or {}).get("network") or "ghostnet_100"
    stem = f"{date}-offline-sm90" + ("" if network == "ghostnet_100" else f"-{network}")
    os.makedirs(results, exist_ok=True)
    table = _load_table(table_path)
    new = choice.offline_from_rows(data["rows"], f"benchmarks/results/{stem}.json")
    old = table.get("offline") or {}
    keys = {choice.row_key(r) for r in new["rows"]}
    kept = [r for r in old.get("rows", []) if choice.row_key(r) not in keys]
    sources = [s for s in str(old.get("source", "")).split("; ") if s and kept and s != new["source"]]
    table["offline"] = dict(new, rows=kept + new["rows"], source="; ".join(sources + [new["source"]]))
    _write_table(table_path, table)
    # "chosen" as the table just written decides it (the run itself saw the table before)
    import torch

    from ghost_kernels.bench.offline import report
    from ghost_kernels.core.spec import GhostSpec
    for cache in (choice._raw, choice.offline_predictions, choice.offline_within_budget, choice.load_table):
        cache.cache_clear()
    for r in data["rows"]:
        spec = GhostSpec(r["inp"], r["oup"], r.get("kernel_size", 1), r["ratio"], r["dw_size"], r["stride"], r["act"])
        dtype = getattr(torch, r["dtype"])
        r["chosen"] = choice.triton_family(spec, r["h"], r["w"], dtype, r["layout"] == "channels_last") == r["family"]
    with open(os.path.join(results, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(results, stem + ".md"), "w") as f:
        f.write(report.markdown(data["rows"], data.get("meta")))
    return stem


def publish_lab_files(out_dir: str, results: str) -> str:
    """A lab call without a timing phase (``--phases train`` or ``--phases model`` alone): its files
    under benchmarks/results/, named after the phase that ran; the choice table is left as it is."""
    ran = [p for p in ("train", "model") if os.path.exists(os.path.join(out_dir, f"{p}.json"))]
    with open(os.path.join(out_dir, f"{ran[0]}.json")) as f:
        stem = _stem(json.load(f), "-lab")
    os.makedirs(results, exist_ok=True)
    for phase in LAB_PHASES:
        src = os.path.join(out_dir, f"{phase}.json")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(results, f"{stem}-{phase}.json"))
    return stem


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--table", default=DEFAULT_TABLE)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.out_dir, "timing.json")):
        return publish_lab(args.out_dir, args.table, args.results)
    if os.path.exists(os.path.join(args.out_dir, "offline.json")):
        return publish_offline(args.out_dir, args.table, args.results)
    if any(os.path.exists(os.path.join(args.out_dir, f"{p}.json")) for p in ("train", "model")):
        return publish_lab_files(args.out_dir, args.results)
    return publish_suite(args.out_dir)


if __name__ == "__main__":
    print("published", main())
