"""Commit-ready copies of a GPU suite run: ``python benchmarks/publish.py OUTDIR``.

Copies OUTDIR/bench.json and bench.md to benchmarks/results/<date>-<gpu>.{json,md} (plots as
<date>-<gpu>-*.png) and rewrites benchmarks/RESULTS.md with the newest run's tables.
"""
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(out_dir: str) -> str:
    with open(os.path.join(out_dir, "bench.json")) as f:
        data = json.load(f)
    slug = re.sub(r"[^a-z0-9]+", "-", data["device"].lower()).strip("-")
    stem = f"{data['date']}-{slug}" + ("-quick" if data.get("quick") else "")
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/publish.py OUTDIR")
    print("published", main(sys.argv[1]))
