"""GPU check: VGG-19 compiled on the CPU vs the GPU, float32 vs mixed precision, and the
worker's batched path, under KERAS_BACKEND=jax or torch. Run by ``bench/gpu_check.sh``.

Every figure is images per second, the median of ``--repeats`` timed calls after two
warm-up calls (compilation), with a ratio against a baseline measured in this run:

1. the compiled model (``jax.jit`` of the stateless call / torch ``no_grad``), input
   already on the device, batch ``--cpu-batch``: on the CPU, then on the GPU;
2. on the GPU, batch ``--batch`` (``THYROCAD_GPU_BATCH_MAX``): the float32 model vs
   the same ``.keras`` file loaded as the worker loads it on a GPU, in mixed_float16;
3. the worker's batched path: ``Classifier.predict`` on uint8 images in host memory,
   batch ``--batch``, vs the compiled call of (2) at the same batch and precision.

The GPU is pinned as ``thyrocad worker --device gpu:N`` pins it (``worker.device``).
No GPU that the backend sees: prints ``no GPU: <why>`` and exits 0. ``--force-cpu``
times every step on the CPU (the accelerator's rows say ``cpu``), so the timing code
runs where no GPU exists (``tests/unit/test_gpu_check.py``).

    bench/gpu_check.sh                                     # what to run on a GPU machine
    python bench/gpu_check.py --force-cpu --input-size 32 --batch 4 --repeats 2
    python bench/gpu_check.py --probe                      # "gpu NAMES" or "cpu DEVICES"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from thyrocad.worker.device import Device, pin_environment  # noqa: E402

CLASSES = ("autoimmune", "normal")


def devices(backend: str) -> tuple[list[str], list[str]]:
    """(every device, the GPUs) the backend sees."""
    if backend == "jax":
        import jax

        found = jax.devices()  # the default platform's: the GPUs when there are any
        names = [f"{d.platform}:{d.id} {d.device_kind}" for d in found]
        return names, [n for n, d in zip(names, found, strict=True) if d.platform == "gpu"]
    if backend == "torch":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [f"gpu:{i} {torch.cuda.get_device_name(i)}" for i in range(count)]
        return ["cpu", *gpus], gpus
    raise SystemExit(f"gpu_check runs under KERAS_BACKEND=jax or torch, not {backend!r}")


def build(device: str, size: int) -> Any:
    """VGG-19 with random weights (speed does not depend on them), its variables on ``device``."""
    import keras

    from thyrocad.models.architectures import build_model

    keras.utils.set_random_seed(0)
    with keras.device(device):
        return build_model("vgg19", classes=CLASSES, input_size=size, weights=None)


def compiled(backend: str, model: Any, device: str, images: np.ndarray) -> Callable[[], Any]:
    """A call of the compiled ``model`` on ``images`` already on ``device``, waited for."""
    if backend == "jax":
        import jax

        platform, index = device.split(":")
        target = jax.devices(platform)[int(index)]
        trainable = jax.device_put([v.value for v in model.trainable_variables], target)
        fixed = jax.device_put([v.value for v in model.non_trainable_variables], target)
        inputs = jax.device_put(images, target)

        @jax.jit
        def call(trainable: Any, fixed: Any, x: Any) -> Any:
            return model.stateless_call(trainable, fixed, x.astype("float32"), training=False)[0]

        return lambda: call(trainable, fixed, inputs).block_until_ready()
    import keras
    import torch

    target = torch.device(device.replace("gpu", "cuda"))
    inputs = torch.as_tensor(images, device=target)

    def run() -> Any:
        with torch.no_grad(), keras.device(device):
            out = model(inputs.float(), training=False)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        return out

    return run


def rate(call: Callable[[], Any], batch: int, repeats: int) -> float:
    """Images per second: ``batch`` over the median of ``repeats`` calls after 2 warm-ups."""
    for _ in range(2):
        call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def images(count: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 1), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    from thyrocad.settings import Settings

    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", type=int, default=0, help="GPU index, as --device gpu:N")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=defaults.gpu_batch_max)
    parser.add_argument("--cpu-batch", type=int, default=defaults.batch_max)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--force-cpu", action="store_true", help="time everything on the CPU")
    parser.add_argument("--probe", action="store_true", help="print what the backend sees")
    args = parser.parse_args(argv)

    pin_environment(Device() if args.force_cpu else Device(args.gpu))
    import keras

    backend = keras.backend.backend()
    seen, gpus = devices(backend)
    if args.probe:
        print(("gpu " + "; ".join(gpus)) if gpus else ("cpu " + "; ".join(seen)))
        return 0
    if not gpus and not args.force_cpu:
        print(f"no GPU: the {backend} backend sees only {', '.join(seen) or 'nothing'}")
        return 0
    accel = "cpu:0" if args.force_cpu else "gpu:0"  # GPU N is the only one visible
    label = "cpu (forced)" if args.force_cpu else f"gpu:{args.gpu} ({gpus[0]})"
    size, batch, cpu_batch = args.input_size, args.batch, min(args.cpu_batch, args.batch)
    print(f"gpu_check: Keras backend {backend}, accelerator {label}, VGG-19 at {size} px")

    # 1. The compiled model, CPU vs GPU, same batch, input on the device.
    small = images(cpu_batch, size)
    on_cpu = rate(
        compiled(backend, build("cpu:0", size), "cpu:0", small), cpu_batch, args.cpu_repeats
    )
    model = build(accel, size)
    on_accel = rate(compiled(backend, model, accel, small), cpu_batch, args.repeats)
    print(
        f"compiled model, batch {cpu_batch}: cpu {on_cpu:.1f} img/s, {accel} {on_accel:.1f} img/s"
    )
    print(f"ratio compiled {accel} / cpu, batch {cpu_batch}: {on_accel / on_cpu:.2f} x")

    # 2. float32 vs mixed precision on the GPU: the .keras file loaded as the worker does.
    from thyrocad.models.classifier import load_classifier

    meta = {"architecture": "vgg19", "classes": list(CLASSES), "input_size": size}
    big = images(batch, size, seed=2)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        with keras.device(accel):
            plain = load_classifier(path, "check-f32", meta)
            mixed = load_classifier(path, "check-f16", meta)
            mixed.use_mixed_precision()
    plain.max_batch = mixed.max_batch = batch
    f32 = rate(compiled(backend, plain.model, accel, big), batch, args.repeats)
    f16 = rate(compiled(backend, mixed.model, accel, big), batch, args.repeats)
    print(
        f"{accel} compiled, batch {batch}: float32 {f32:.1f} img/s, mixed_float16 {f16:.1f} img/s"
    )

    # 3. The worker's batched path: Classifier.predict on uint8 images in host memory.
    with keras.device(accel):
        host = big[..., 0]
        w32 = rate(lambda: plain.predict(host), batch, args.repeats)
        w16 = rate(lambda: mixed.predict(host), batch, args.repeats)
        gap = float(np.abs(plain.predict(host) - mixed.predict(host)).max())
    print(
        f"worker path, Classifier.predict, batch {batch}: float32 {w32:.1f} img/s, "
        f"mixed_float16 {w16:.1f} img/s (largest probability difference {gap:.1e})"
    )
    print(machine())
    print(f"ratio worker path / compiled call, float32, batch {batch}: {w32 / f32:.2f} x")
    print(f"ratio worker path / compiled call, mixed_float16, batch {batch}: {w16 / f16:.2f} x")
    print(f"ratio mixed_float16 / float32 on {accel}, batch {batch}: {f16 / f32:.2f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
