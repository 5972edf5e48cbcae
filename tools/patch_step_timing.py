"""Interleaved timing of bench/test_bench_patch.py's train steps, for a machine shared with other jobs.

pytest-benchmark times all rounds of one side, then the other: on a loaded 2-core machine the load changes between
them and the ratio with it. This runs patched and unpatched steps alternately (A B A B ...) on the same models, and
reports per side the median wall time and the median process CPU time (user + system of this process: time spent
waiting for a core shared with other jobs does not count). Usage (from the repository root):

    python tools/patch_step_timing.py [--batch 8] [--rounds 3] [--models bert_mlm,roberta_mlm] [--dtypes fp32,bf16-autocast]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=None, help="comma-separated names of test_bench_patch.MODELS")
    parser.add_argument("--dtypes", default="fp32,bf16-autocast")
    args = parser.parse_args()
    os.environ["ELECTRA_FAST_BENCH_PATCH_BATCH"] = str(args.batch)
    import test_bench_patch as bench

    names = args.models.split(",") if args.models else list(bench.MODELS)
    print("| model | shape | dtype | patched wall | transformers wall | speed-up wall | patched CPU | transformers CPU "
          "| speed-up CPU |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        for dtype in args.dtypes.split(","):
            steps = {impl: bench._step_fn(name, impl, dtype) for impl in ("fused", "transformers")}
            times = {impl: ([], []) for impl in steps}
            for impl, step in steps.items():
                step()  # warm-up
            for _ in range(args.rounds):
                for impl, step in steps.items():
                    w0, c0 = time.perf_counter(), time.process_time()
                    step()
                    times[impl][0].append(time.perf_counter() - w0)
                    times[impl][1].append(time.process_time() - c0)
            (fw, fc), (tw, tc) = ([statistics.median(x) for x in times[i]] for i in ("fused", "transformers"))
            print(f"| {name} | {args.batch}x{bench.T} | {dtype} | {fw:.2f} s | {tw:.2f} s | {tw / fw:.2f}x | "
                  f"{fc:.2f} s | {tc:.2f} s | {tc / fc:.2f}x |", flush=True)
            del steps


if __name__ == "__main__":
    main()
