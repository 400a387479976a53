#!/usr/bin/env python3
"""PyTorch reference for xax's TrainStep benchmark: one AdamW training step of an MLP 784-512-512-10.

Each timed step is exactly what a PyTorch user writes: ``zero_grad`` + forward + cross-entropy + backward +
``AdamW.step()``. ``--policy default`` runs in fp32; ``--policy mixed`` runs forward and loss under
``torch.autocast('cpu', dtype=torch.bfloat16)`` with fp32 parameters (PyTorch's CPU mixed precision).
The data is a fixed synthetic batch (inputs N(0, 1), labels uniform over the classes), as in xax's benchmark.

Command line (a stable contract: xax's benchmark binary invokes this script):

    python3 torch_mlp.py [--threads T] [--policy default|mixed] [--steps N] [--warmup W]
                         [--batch-size B] [--json OUT] [--system-malloc]

    --threads     compute threads (default 1). Pinned through torch.set_num_threads AND the OMP_NUM_THREADS /
                  OPENBLAS_NUM_THREADS / MKL_NUM_THREADS environment variables, set before torch is imported,
                  because PyTorch's fp32 matmul goes through OpenBLAS, which ignores torch.set_num_threads.
    --policy      default (fp32) or mixed (autocast bf16); default "default".
    --steps       timed steps (default 50); --warmup untimed steps before them (default 10).
    --batch-size  batch size (default 256).
    --json OUT    also write the result as JSON to OUT.
    --system-malloc  keep glibc's default allocator settings (see below).

PyTorch allocates its activations and gradients afresh every step, and glibc's defaults hand freed memory back
to the kernel, so every step pays first-touch page faults again. On virtual machines where those are expensive
this dominates the step (measured here: mixed, 1 thread, 26.6 ms median with the defaults, 4.8 ms without the
churn). The script therefore re-executes itself once with MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and
MALLOC_TOP_PAD_ set so that freed memory stays in the process: the comparison measures PyTorch's compute at its
best, not the kernel. --system-malloc measures the defaults instead.

Output: one line on stdout, ``median_step_ms=<float>``, followed by a human-readable summary line. The JSON
object has the keys ``policy``, ``threads``, ``batch_size``, ``steps``, ``warmup``, ``median_step_ms``,
``mean_step_ms``, ``min_step_ms``, ``step_ms`` (every timed step), ``torch_version``, ``final_loss`` and
``malloc_tuned``.
Exit status: 0 on success, 2 on bad arguments (argparse), 3 when torch cannot be imported.

Run it with Debian's own interpreter (``/usr/bin/python3``), which is the one that sees ``python3-torch``.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="compute threads (default 1)")
    parser.add_argument("--policy", choices=("default", "mixed"), default="default",
                        help="default: fp32; mixed: autocast bf16 (default: default)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default allocator settings (PyTorch then pays page faults every step)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


# glibc reads these once, at process start: keep freed memory in the process (no trimming, no per-allocation mmap).
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(1 << 28),
}
TUNED_MARKER = "XAX_TORCH_MLP_MALLOC_TUNED"


def main(argv):
    args = parse_args(argv)
    if not args.system_malloc and os.environ.get(TUNED_MARKER) != "1":
        environment = dict(os.environ, **TUNED_MALLOC, **{TUNED_MARKER: "1"})
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], environment)
    # Before importing torch: OpenBLAS and OpenMP read these once, when they are loaded.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as error:
        print(f"torch_mlp.py: cannot import torch ({error}); install python3-torch and run /usr/bin/python3",
              file=sys.stderr)
        return 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sizes = (784, 512, 512, 10)
    model = torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(),
        torch.nn.Linear(sizes[1], sizes[2]), torch.nn.ReLU(),
        torch.nn.Linear(sizes[2], sizes[3]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = torch.randn(args.batch_size, sizes[0])
    labels = torch.randint(0, sizes[-1], (args.batch_size,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        if args.policy == "mixed":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(inputs), labels)
        else:
            loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    times_ms = []
    loss = None
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times_ms.append((time.perf_counter() - start) * 1e3)

    result = {
        "policy": args.policy,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "median_step_ms": statistics.median(times_ms),
        "mean_step_ms": statistics.fmean(times_ms),
        "min_step_ms": min(times_ms),
        "step_ms": times_ms,
        "torch_version": torch.__version__,
        "final_loss": float(loss),
        "malloc_tuned": not args.system_malloc,
    }
    print(f"median_step_ms={result['median_step_ms']:.4f}")
    print(f"torch {torch.__version__}: MLP {'-'.join(map(str, sizes))}, batch {args.batch_size}, AdamW, "
          f"policy {args.policy}, {args.threads} thread(s): median {result['median_step_ms']:.3f} ms, "
          f"min {result['min_step_ms']:.3f} ms over {args.steps} steps"
          f"{'' if result['malloc_tuned'] else ' (glibc malloc defaults)'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
