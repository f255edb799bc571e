"""Why `channels_last` is catrs's one inference default: a sweep's proxy pattern, per inference mode.

    .venv/bin/python benchmarks/inference_default.py [--evaluations 4] [--images 300] [--n 256]

A sweep trial certifies the val split at each of its rungs with a new `Smooth` (as `ProxyEvaluation` does),
in a fresh process. Each mode runs in its own subprocess with an empty TorchInductor cache, as a trial on a
fresh cluster node would, and prints the seconds of each evaluation and their total. `compile` is the fastest
per sample once compiled (see `certify_throughput.py`); this shows what its compilation costs a short job.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

MODES = ("eager", "channels_last", "compile")


def one_mode(mode: str, evaluations: int, images: int, n: int) -> None:
    import torch

    from catrs.certify import CertifySettings, certify_rows
    from catrs.data import get_dataset
    from catrs.models import create_model
    from catrs.sampling import Mode, SamplingProtocol

    model = create_model("digits_cnn", 10).eval()
    val = get_dataset("digits", "val")
    settings = CertifySettings(SamplingProtocol(n0=32, n=n, batch=1000), inference=mode)
    seconds = []
    for _ in range(evaluations):
        began = time.perf_counter()
        smooth = settings.smoothed(model, 10, 0.5)
        for _rows in certify_rows(smooth, val, list(range(min(images, len(val)))), settings, Mode.EVALUATE):
            pass
        seconds.append(time.perf_counter() - began)
    print(
        f"{mode:14}{' '.join(f'{s:6.2f}' for s in seconds)}   total {sum(seconds):6.2f} s  "
        f"(threads {torch.get_num_threads()})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=4)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one subprocess's part
    args = parser.parse_args()
    if args.mode:
        one_mode(args.mode, args.evaluations, args.images, args.n)
        return
    print(f"digits_cnn, {args.images} val images, n = {args.n}, {args.evaluations} evaluations (seconds each):")
    for mode in MODES:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            command = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--evaluations",
                str(args.evaluations),
                "--images",
                str(args.images),
                "--n",
                str(args.n),
            ]
            subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
