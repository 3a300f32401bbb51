"""The loss's log-softmax, two layouts: logits transposed to (batch, vocab, positions), as
pipeline.token_nll_sums passed them before 2026-11-27, vs flattened to (tokens, vocab), as now.

    python benchmarks/cross_entropy_layout.py [--vocab 49152] [--repeats 20]

Times forward + backward of F.cross_entropy(reduction="none") in fp32 on the GPU (CUDA events,
after warm-up) for a few batch shapes of a SmolLM2 training step, checks that both layouts give the
same per-token NLL and gradient, and prints a markdown table. Needs only torch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152)")
    p.add_argument("--shapes", default="8x450,8x150,16x900",
                   help="batch x kept positions, comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per case")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def nll_transposed(logits, targets):
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def nll_flat(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                           reduction="none").view_as(targets)


def time_ms(fn, logits, targets, repeats, device) -> float:
    for _ in range(3):
        fn(logits, targets).sum().backward()
    if device.type != "cuda":
        import time
        start = time.perf_counter()
        for _ in range(repeats):
            fn(logits, targets).sum().backward()
        return (time.perf_counter() - start) * 1000 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        fn(logits, targets).sum().backward()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, vocab {args.vocab}, fp32, fwd+bwd\n")
    print("| batch x positions | transposed ms | flat ms | speed-up | max NLL diff | max grad diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        batch, positions = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(batch, positions, args.vocab, device=device, generator=g) * 3
        logits.requires_grad_(True)
        targets = torch.randint(0, args.vocab, (batch, positions), device=device, generator=g)
        a = nll_transposed(logits, targets)
        grad_a, = torch.autograd.grad(a.sum(), logits)
        b = nll_flat(logits, targets)
        grad_b, = torch.autograd.grad(b.sum(), logits)
        nll_diff = (a - b).abs().max().item()
        grad_diff = (grad_a - grad_b).abs().max().item()
        old = time_ms(nll_transposed, logits, targets, args.repeats, device)
        new = time_ms(nll_flat, logits, targets, args.repeats, device)
        print(f"| {batch} x {positions} | {old:.2f} | {new:.2f} | {old / new:.1f}x | "
              f"{nll_diff:.2e} | {grad_diff:.2e} |")


if __name__ == "__main__":
    main()
