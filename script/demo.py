"""One real image-to-video prediction through the real Cog server, without Docker; writes an MP4.

On a machine with CUDA, uses the real CogVideoX-5b-I2V weights when their source answers (COGVIDEOX_I2V_WEIGHTS_URL:
a tar URL or hf://THUDM/CogVideoX-5b-I2V; ~20 GB to download). Without CUDA it never fetches them unless asked with
--real-weights (the 5B model then runs in float32 on the CPU: ~41 GB of RAM, hours): by default it builds tiny random
weights of the real architecture offline (720x480 output, noise-like content) and serves them from 127.0.0.1;
likewise random RIFE weights when RIFE_WEIGHTS_URL's source does not answer. Either way the predictor, setup() and
the server are the production ones.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import interpolation  # noqa: E402
import predict_i2v  # noqa: E402
import tiny_weights  # noqa: E402
from harness import CogServer, data_url, serve_directory  # noqa: E402

log = logging.getLogger("demo")


def reachable(source: str) -> bool:
    """Whether the weights source answers: a tar URL, or a hub repo (hf://OWNER/NAME[@REVISION])."""
    if source.startswith("hf://"):
        from huggingface_hub import HfApi

        repo, _, revision = source.removeprefix("hf://").partition("@")
        try:
            HfApi().model_info(repo, revision=revision or None, timeout=5)
            return True
        except Exception:  # no network, no such repo, no access: all mean "use the tiny weights"
            return False
    try:
        return httpx.head(source, timeout=5, follow_redirects=True).status_code == 200
    except httpx.HTTPError:
        return False


def tiny_because(url: str, *, cuda: bool, asked: bool) -> str | None:
    """Why the demo uses tiny weights instead of the real ones at `url` (None: it uses the real ones). Without CUDA
    the source is not even asked unless `asked` (--real-weights): no tens of GB by surprise."""
    if not (cuda or asked):
        return "no CUDA (--real-weights fetches the real ones anyway)"
    if not reachable(url):
        return f"the real weights are unreachable ({url})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, help="input image (default: a generated gradient)")
    parser.add_argument("--prompt", default="a boat drifting on a calm lake at sunset")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 real, 2 tiny)")
    parser.add_argument("--output", type=Path, default=Path("output.mp4"))
    parser.add_argument(
        "--real-weights",
        action="store_true",
        help="fetch and run the real weights even without CUDA (~20 GB download, ~41 GB of RAM, float32 on the CPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="demo-"))

    checkpoint = predict_i2v.CHECKPOINT
    url, steps, static = os.environ.get(checkpoint.variable) or checkpoint.source, args.steps or 50, None
    if why := tiny_because(url, cuda=torch.cuda.is_available(), asked=args.real_weights):
        log.info("Tiny random CogVideoX-5b-I2V weights, built offline: %s", why)
        tiny_weights.make_tar(tiny_weights.build_i2v(work / "tiny", 60, 90), work / "served" / "i2v.tar")
        static = serve_directory(work / "served")
        url, steps = f"http://127.0.0.1:{static.server_port}/i2v.tar", args.steps or 2
    rife_url = os.environ.get(interpolation.VARIABLE) or interpolation.DEFAULT_SOURCE
    if not reachable(rife_url):
        log.info("RIFE weights unreachable (%s): random ones in the published layout", rife_url)
        tiny_weights.build_rife(work / "served" / "rife.pth")
        static = static or serve_directory(work / "served")
        os.environ[interpolation.VARIABLE] = f"http://127.0.0.1:{static.server_port}/rife.pth"  # the server inherits

    image = args.image or work / "input.png"
    if not args.image:
        x = np.linspace(0, 255, 720)[None, :, None] * np.array([1.0, 0.6, 0.3])
        Image.fromarray(np.broadcast_to(x, (480, 720, 3)).astype(np.uint8)).save(image)

    server = CogServer(
        "predict_i2v", weights_url=url, cache=Path(os.environ.get("WEIGHTS_CACHE_DIR", "model_cache")), log=work / "log"
    )
    try:
        log.info("Starting the Cog server (setup downloads and loads the weights)...")
        server.wait_ready(timeout=3600)
        inputs = {"image": data_url(image), "prompt": args.prompt, "num_inference_steps": steps, "seed": 42}
        result = server.predict(timeout=3 * 3600, **inputs)  # a real 50-step run on a slow GPU: many minutes
    finally:
        server.close()
        if static:
            static.shutdown()
    print(result.get("logs", ""))
    if result["status"] != "succeeded":
        sys.exit(f"Prediction {result['status']}: {result.get('error')}")
    args.output.write_bytes(base64.b64decode(result["output"].split(",", 1)[1]))
    log.info("Wrote %s (%s)", args.output, {k: round(v, 2) for k, v in result["metrics"]["timing"].items()})


if __name__ == "__main__":
    main()
