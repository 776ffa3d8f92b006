"""Soak: many sequential predictions through the real Cog server, valid and invalid inputs mixed.

Starts the i2v and/or v2v server on tiny offline weights (tests/faulty_predictors.py: the production predictors,
plus an out-of-memory fault on a magic prompt, which the soak mixes in), with TMPDIR pointing at a fresh folder.
Cycles through the bad-input corpus of tests/bad_inputs.py with a valid reference request after every failure,
and checks every result as the test suite does. Reports: predictions, unexpected results, worker RSS (start, end,
max), the temp dir's largest size and file count, and the time taken.

    python benchmarks/soak.py --model i2v --predictions 120 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import bad_inputs  # noqa: E402
import faulty_predictors  # noqa: E402
from bad_inputs import Case  # noqa: E402
from test_reliability import Reliable  # noqa: E402

import tiny_weights  # noqa: E402
from harness import serve_directory  # noqa: E402

BUILDS = {"i2v": tiny_weights.build_i2v, "v2v": tiny_weights.build_v2v}
CASES = {"i2v": bad_inputs.i2v_cases, "v2v": bad_inputs.v2v_cases}
OOM_ERROR = "Out of GPU memory during inference: try fewer frames, a smaller size or fewer inference steps."


def soak(model: str, predictions: int, work: Path, static_url: str) -> dict:
    corpus = {"dir": work / "served" / "corpus", "url": f"{static_url}/corpus"}
    (work / f"server-{model}").mkdir()
    r = Reliable(model, f"{static_url}/{model}.tar", work / f"server-{model}", corpus)
    cases = CASES[model]() + [Case("out of memory", {"prompt": faulty_predictors.OOM}, error=OOM_ERROR)]
    r.assert_recovers()  # warm
    rss = [r.worker().memory_info().rss]
    tmp_bytes, tmp_files, unexpected, done, failed, start = 0, 0, [], 1, 0, time.perf_counter()
    i = 0
    try:
        while done < predictions:
            case = cases[i % len(cases)]
            i += 1
            try:
                r.check(case, r.predict(case.inputs))
                done += 1
                if not case.ok:
                    failed += 1
                    r.assert_recovers()  # a valid prediction after every failure: the same video as a fresh server
                    done += 1
            except AssertionError as e:  # keep going: count it
                unexpected.append(f"{case.name}: {str(e)[:300]}")
                done += 1
            rss.append(r.worker().memory_info().rss)
            files = [f for f in r.tmp.rglob("*") if f.is_file() and "torchinductor" not in str(f.relative_to(r.tmp))]
            tmp_bytes, tmp_files = max(tmp_bytes, sum(f.stat().st_size for f in files)), max(tmp_files, len(files))
        status = r.server.status()
    finally:
        r.server.close()
    return {
        "model": model,
        "predictions": done + 1,  # and the reference one
        "failed_as_expected": failed,
        "unexpected": unexpected,
        "server_status_at_end": status,
        "rss_mib_start": round(rss[0] / 2**20),
        "rss_mib_end": round(rss[-1] / 2**20),
        "rss_mib_max": round(max(rss) / 2**20),
        "rss_mib_by_tenth": [round(rss[len(rss) * k // 10] / 2**20) for k in range(10)],  # growth or plateau
        "tmp_max_bytes": tmp_bytes,
        "tmp_max_files": tmp_files,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["i2v", "v2v", "both"], default="both")
    parser.add_argument("--predictions", type=int, default=120, help="per model (at least)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    served = work / "served"
    bad_inputs.make_images(served / "corpus")
    bad_inputs.make_videos(served / "corpus")
    models = ["i2v", "v2v"] if args.model == "both" else [args.model]
    for model in models:
        tiny_weights.make_tar(BUILDS[model](work / f"tiny-{model}"), served / f"{model}.tar")
    static = serve_directory(served)
    try:
        results = [soak(m, args.predictions, work, f"http://127.0.0.1:{static.server_port}") for m in models]
    finally:
        static.shutdown()
    for result in results:
        print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(1 if any(r["unexpected"] or r["server_status_at_end"] != "READY" for r in results) else 0)


if __name__ == "__main__":
    main()
