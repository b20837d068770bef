"""Measure the local provider's embedding throughput against this machine's arithmetic rate.

Run ``python -m imgbench.embed_bench [--backbone NAME] [--image-size PIXELS]``.
It prints images per second for the eager backbone (EfficientNet-Lite0 by
default) and for the traced, channels-last model the local provider uses, the
backbone's multiply-adds per image, and a float32 matrix multiply rate as the
machine's reference arithmetic rate. A mode with the mirror image
(``ridge-flip``) runs two forward passes per image.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from imgbench.embedding import BACKBONES, build_features, get_backbone, load_model


def images_per_second(forward, batch, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        forward(batch)
        started = time.perf_counter()
        for _ in range(repeats):
            forward(batch)
        elapsed = time.perf_counter() - started
    return repeats * batch.shape[0] / elapsed


def count_multiply_adds(model, image_size: int) -> int:
    """Count the multiply-adds of every convolution for one image, with forward hooks."""
    import torch

    total = 0

    def hook(module, inputs, output):
        nonlocal total
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return total


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes (default: 5)")
    parser.add_argument("--backbone", default="efficientnet-lite0", choices=sorted(BACKBONES),
                        help="backbone to measure (default: efficientnet-lite0)")
    parser.add_argument("--image-size", type=int, help="input size in pixels (default: the backbone's)")
    args = parser.parse_args(argv)

    import torch

    spec = get_backbone(args.backbone, args.image_size)
    eager = build_features(spec).eval()
    traced = load_model(spec)
    batch = torch.randn(args.batch, 3, spec.image_size, spec.image_size)

    eager_rate = images_per_second(lambda x: eager(x).mean((2, 3)), batch, args.repeats)
    traced_rate = images_per_second(traced, batch.contiguous(memory_format=torch.channels_last), args.repeats)
    gflop_per_image = 2 * count_multiply_adds(eager, spec.image_size) / 1e9
    peak = matmul_gflops()

    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{spec.name} at {spec.image_size} px: {gflop_per_image:.2f} GFLOP per image")
    print(f"eager:                 {eager_rate:6.1f} images/s ({eager_rate * gflop_per_image:5.1f} GFLOP/s)")
    print(f"traced, channels-last: {traced_rate:6.1f} images/s ({traced_rate * gflop_per_image:5.1f} GFLOP/s)")
    print(f"float32 1024x1024 matrix multiply: {peak:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
