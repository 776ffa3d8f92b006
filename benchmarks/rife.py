"""What RIFE frame interpolation costs on the CPU: its share of a prediction, and its time per new frame by size.

(a) The real setup() and run() of predict_i2v on a tiny CogVideoX-5b-I2V (96x64 frames, tests/tiny_weights), with
    random RIFE weights in the published layout at the real widths (so RIFE's own compute is the real one), served
    from 127.0.0.1 as the tests do: run() end to end with interpolation 1, 2 and 4, and RIFE's interpolate() alone
    on the generated frames. The tiny CogVideoX costs a sliver of the real one, so the share here is an upper bound
    of nothing in production: it shows the code path and RIFE's absolute cost, not the GPU's proportions
    (benchmarks/gpu.py's rife configuration measures those).
(b) interpolate(frames, 2) alone on a sliding pattern (no pair is a duplicate or a cut, so every new frame goes
    through IFNet) at 96x64, 360x240 and 720x480: seconds per new frame.

Medians of --repeats, on however many CPU cores torch uses here.

    python benchmarks/rife.py --json rife.json        # ~3-5 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import predict_i2v  # noqa: E402
import tiny_weights  # noqa: E402
from harness import serve_directory  # noqa: E402
from reporting import logger  # noqa: E402

SEED = 42


def sliding(count: int, height: int, width: int) -> np.ndarray:
    """A smooth pattern moving 2 px a frame: every pair goes through IFNet."""
    y, x = np.mgrid[0:height, 0 : width + 2 * count].astype(np.float32)
    pattern = np.stack([0.5 + 0.4 * np.sin(x / 6), 0.5 + 0.4 * np.cos(y / 5), (x + y) / (x + y).max()], -1)
    return np.stack([pattern[:, 2 * i : 2 * i + width] for i in range(count)]).astype(np.float32)


def median_s(call: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=49, help="frames generated (8N+1)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the tiny model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logger.setLevel(logging.WARNING)
    torch.manual_seed(SEED)
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="rife-bench-") as tmp:
        work = Path(tmp)
        tiny_weights.make_tar(tiny_weights.build_i2v(work / "model"), work / "served" / "i2v.tar")
        tiny_weights.build_rife(work / "served" / "rife.pth")
        server = serve_directory(work / "served")
        base = f"http://127.0.0.1:{server.server_port}"
        os.environ.update(
            WEIGHTS_CACHE_DIR=str(work / "cache"),
            RIFE_WEIGHTS_URL=f"{base}/rife.pth",
            **{predict_i2v.CHECKPOINT.variable: f"{base}/i2v.tar"},
        )
        predictor = predict_i2v.Predictor()
        predictor.setup()
        image = work / "input.png"
        Image.fromarray((sliding(1, 64, 96)[0] * 255).astype(np.uint8)).save(image)
        settings = dict(image=image, num_frames=args.frames, num_inference_steps=args.steps, fps=8, seed=SEED)
        frames = predictor.generate(
            image=Image.open(image).convert("RGB"),
            prompt="",
            negative_prompt="",
            width=96,
            height=64,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=6.0,
            use_dynamic_cfg=True,
            scheduler="cogvideox_dpm",
            seed=SEED,
        )
        predictor.run(**settings, interpolation=2)  # warm-up: the first call at this size pays allocations
        rows = {}
        for factor in (1, 2, 4):
            e2e, _ = median_s(lambda f=factor: predictor.run(**settings, interpolation=f), args.repeats)
            rife, out = median_s(lambda f=factor: predictor.rife.interpolate(frames, f), args.repeats)
            rows[factor] = {
                "e2e_s": e2e,
                "interpolation_s": rife if factor > 1 else 0.0,
                "share": rife / e2e if factor > 1 else 0.0,
                "frames_out": len(out),
            }
            print(
                f"run() 96x64, {args.frames} frames, {args.steps} steps, interpolation {factor}: {e2e:.2f} s; "
                f"RIFE {rows[factor]['interpolation_s']:.2f} s ({rows[factor]['share']:.0%}) -> {len(out)} frames",
                flush=True,
            )
        report["run"] = {"frames": args.frames, "steps": args.steps, "size": "96x64", "by_factor": rows}
        report["per_frame"] = {}
        for width, height in ((96, 64), (360, 240), (720, 480)):
            clip = sliding(5, height, width)
            seconds, _ = median_s(lambda c=clip: predictor.rife.interpolate(c, 2), args.repeats)
            report["per_frame"][f"{width}x{height}"] = seconds / 4
            print(f"interpolate x2 at {width}x{height}: {seconds / 4:.3f} s per new frame", flush=True)
        server.shutdown()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
