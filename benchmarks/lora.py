"""What LoRAs cost the CogVideoX-5b-I2V predictor: switching them, and a denoising step with one active.

Runs the production code: the real setup() of predict_i2v on a tiny CogVideoX-5b-I2V at the real 720x480
(tests/tiny_weights.build_i2v, served as a tar from 127.0.0.1, as the tests do), and its own Loras, with rank-64
LoRAs (tiny_weights.build_lora, on to_q/to_k/to_v/to_out.0) served from 127.0.0.1. Medians of --repeats.

(a) Loras.use() per prediction: the first use of a LoRA (download + check + load), the re-use of the active one,
    a switch between two loaded ones, one evicted from memory (more than KEEP_LOADED used since) but still in the
    file cache (check + load), and back to no LoRA.
(b) One denoising step (a transformer forward with the inputs of a production generate() call: 720x480, CFG batch
    2): fused Q/K/V without a LoRA (the reference: the service without a LoRA), unfused with the LoRA active (the
    service with one), and the LoRA merged into the weights with pipe.fuse_lora() (unfused Q/K/V, then re-fused),
    for comparison, with their output's difference from the active LoRA's.

Tiny models on the CPU: the overheads (Python, peft layers, unfused projections, file handling) show, the real
model's compute does not; the LoRA files are tens of KB where real ones are 100+ MB.

    python benchmarks/lora.py                  # ~3 min on 2 busy CPU cores (49 frames, 7 repeats)
    python benchmarks/lora.py --quick          # ~30-50 s (9 frames, 3 repeats)
    python benchmarks/lora.py --json lora.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import predict_i2v  # noqa: E402
import tiny_weights  # noqa: E402
from harness import serve_directory  # noqa: E402
from lora import KEEP_LOADED  # noqa: E402
from reporting import logger  # noqa: E402

RANK = 64
SEED = 42
PROMPT = "a red boat sails across a calm lake"
SWITCHES = {
    "first": "first use: download + check + load",
    "reuse": "re-use of the active LoRA",
    "switch": "switch between two loaded LoRAs",
    "evicted": f"evicted from memory (> {KEEP_LOADED} used since), file cached: check + load",
    "off": "back to no LoRA (fused Q/K/V)",
}
STEPS = {
    "reference": "fused Q/K/V, no LoRA (reference: the service without a LoRA)",
    "lora": "unfused Q/K/V + active LoRA (the service with a LoRA)",
    "fuse_lora": "LoRA merged by pipe.fuse_lora(), unfused Q/K/V",
    "fuse_lora_qkv": "LoRA merged by pipe.fuse_lora(), Q/K/V re-fused",
}


def set_up(workdir: Path, base_url: str) -> predict_i2v.Predictor:
    """The predictor's real setup(), its weights a tiny 720x480 model tarred and served from 127.0.0.1."""
    folder = tiny_weights.build_i2v(workdir / "model", sample_height=60, sample_width=90)
    tiny_weights.make_tar(folder, workdir / "served" / "i2v.tar")
    os.environ["WEIGHTS_CACHE_DIR"] = str(workdir / "cache")
    os.environ[predict_i2v.CHECKPOINT.variable] = f"{base_url}/i2v.tar"
    predictor = predict_i2v.Predictor()
    predictor.setup()
    return predictor


def timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def switch_costs(predictor: Any, urls: list[str], repeats: int) -> dict[str, list[float]]:
    """Loras.use() in each situation, once per round, each round with fresh URLs (fresh LoRAs for Loras). The first
    round is a warm-up: it also fills the KEEP_LOADED slots, so every measured round starts as a busy server does."""
    loras = predictor.loras
    samples: dict[str, list[float]] = {case: [] for case in SWITCHES}
    fresh = iter(urls)
    for round_ in range(repeats + 1):
        a, b = next(fresh), next(fresh)
        times = {"first": timed(loras.use, a, 1.0), "reuse": timed(loras.use, a, 1.0)}
        loras.use(b, 1.0)
        times["switch"] = timed(loras.use, a, 1.0)
        loras.use(b, 1.0)  # `a` is now the least recently used but one
        for _ in range(KEEP_LOADED - 1):  # ... and out of memory after these
            loras.use(next(fresh), 1.0)
        if a in loras.loaded.values():
            raise RuntimeError(f"{a} still loaded: Loras evicts differently than this measurement expects")
        times["evicted"] = timed(loras.use, a, 1.0)
        times["off"] = timed(loras.use, "", 0)
        if round_:
            for case, seconds in times.items():
                samples[case].append(seconds)
    return samples


class _Stop(Exception):
    pass


def step_inputs(predictor: Any, frames: int) -> tuple[tuple, dict]:
    """The transformer's inputs at the first denoising step of the production generate() (stopped there)."""
    captured: dict[str, Any] = {}

    def capture(module: Any, args: tuple, kwargs: dict) -> None:
        captured.update(args=args, kwargs=kwargs)
        raise _Stop

    image = Image.new("RGB", (predictor.width, predictor.height), (90, 140, 200))
    handle = predictor.pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        predictor.generate(
            image=image,
            prompt=PROMPT,
            negative_prompt="",
            width=predictor.width,
            height=predictor.height,
            num_frames=frames,
            num_inference_steps=50,
            guidance_scale=6.0,
            use_dynamic_cfg=True,
            scheduler="cogvideox_dpm",
            seed=SEED,
        )
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def step_costs(predictor: Any, url: str, frames: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Per-step time of each configuration in STEPS. They take turns, one forward each per round after a warm-up
    round, so that the load of a shared machine changing meanwhile hits them alike."""
    args, kwargs = step_inputs(predictor, frames)
    loras, transformer = predictor.loras, predictor.pipe.transformer
    loras.use(url, 1.0)
    merged = copy.deepcopy(predictor.pipe)  # the LoRA active in it: fuse_lora() merges it into the copy's weights
    merged.fuse_lora()
    unfused = merged.transformer.attn_processors
    merged.transformer.fuse_qkv_projections()  # rebuilt from the merged weights
    fused = merged.transformer.attn_processors
    configurations = {
        "reference": (transformer, functools.partial(loras.use, "", 0)),
        "lora": (transformer, functools.partial(loras.use, url, 1.0)),
        "fuse_lora": (merged.transformer, lambda: merged.transformer.set_attn_processor(dict(unfused))),
        "fuse_lora_qkv": (merged.transformer, lambda: merged.transformer.set_attn_processor(dict(fused))),
    }
    times: dict[str, list[float]] = {name: [] for name in configurations}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for name, (model, configure) in configurations.items():
                configure()
                start = time.perf_counter()
                outputs[name] = model(*args, **kwargs)[0]
                if round_:
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["reference"])
    return {
        name: {
            "median_s": statistics.median(samples),
            "vs_reference": statistics.median(samples) / reference,
            "max_abs_diff_vs_lora": (outputs[name] - outputs["lora"]).abs().max().item(),
            "samples_s": samples,
        }
        for name, samples in times.items()
    }


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"Loras.use() on the CogVideoX-5b-I2V predictor (tiny model, rank-{RANK} LoRA of {meta['lora_kb']:.0f} KB), "
        f"medians of {meta['repeats']}:",
        "",
        "| case | median ms | min ms | max ms |",
        "|---|---|---|---|",
    ]
    for case, samples in report["switch"].items():
        lines.append(
            f"| {SWITCHES[case]} | {statistics.median(samples) * 1e3:.2f} | {min(samples) * 1e3:.2f} | "
            f"{max(samples) * 1e3:.2f} |"
        )
    lines += [
        "",
        f"One denoising step (transformer forward, {meta['width']}x{meta['height']}, {meta['frames']} frames, "
        f"CFG batch 2), medians of {meta['repeats']}:",
        "",
        "| configuration | s/step | vs reference | output max abs diff vs active LoRA |",
        "|---|---|---|---|",
    ]
    for name, result in report["step"].items():
        lines.append(
            f"| {STEPS[name]} | {result['median_s']:.4f} | {result['vs_reference']:.3f}x | "
            f"{result['max_abs_diff_vs_lora']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, help="measured repeats of each case (default 7; --quick 3)")
    parser.add_argument("--frames", type=int, help="frames of the step measurement (default 49; --quick 9)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 9 frames, 3 repeats (~30-50 s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    frames = args.frames or (9 if args.quick else 49)

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "served").mkdir()
        server = serve_directory(workdir / "served")
        base_url = f"http://127.0.0.1:{server.server_port}"
        try:
            predictor = set_up(workdir, base_url)
            setup_s = time.perf_counter() - start
            logger.setLevel(logging.WARNING)  # not a log line per LoRA used
            lora_file = tiny_weights.build_lora(workdir / "model", workdir / "lora", rank=RANK, alpha=RANK)
            lora_kb = lora_file.stat().st_size / 1e3
            urls = []  # one LoRA under many names: a fresh one for Loras each time (its cache is keyed by source)
            for index in range((repeats + 1) * (KEEP_LOADED + 1)):
                shutil.copyfile(lora_file, workdir / "served" / f"lora-{index}.safetensors")
                urls.append(f"{base_url}/lora-{index}.safetensors")
            switch = switch_costs(predictor, urls, repeats)
            step = step_costs(predictor, urls[0], frames, repeats)
        finally:
            server.shutdown()
    report = {
        "meta": {
            "model": f"tiny {predict_i2v.CHECKPOINT.name} (tests/tiny_weights.build_i2v, sample 60x90)",
            "width": predictor.width,
            "height": predictor.height,
            "frames": frames,
            "repeats": repeats,
            "lora_rank": RANK,
            "lora_kb": lora_kb,
            "torch_threads": torch.get_num_threads(),
            "setup_s": setup_s,
            "total_s": time.perf_counter() - start,
        },
        "switch": switch,
        "step": step,
    }
    print(markdown(report))
    print(f"\nsetup() {setup_s:.1f} s, total {report['meta']['total_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
