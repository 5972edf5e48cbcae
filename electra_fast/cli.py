"""The ``electra-fast`` command (also ``python -m electra_fast``)."""
from __future__ import annotations

import sys

from ._console import hold_standard_descriptors, paths_printable, say, settle_stdout


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while a command's modules load, or in one without its own handling (bench)
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        say("electra-fast: interrupted")
        return 130


def _main(argv) -> int:
    hold_standard_descriptors()
    paths_printable()
    from .finetune import cli as finetune_cli
    from .train import cli as train_cli
    parser = train_cli.Parser(prog="electra-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extension status and which backend serves each op")
    sub.add_parser("demo", help="run the RTD-loss op on every available backend")
    bench = sub.add_parser("bench", help="run the benchmark suite (bench/) and write JSON, RESULTS.md and plots")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and rounds (a smoke test, < 3 min on CPU)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None)
    bench.add_argument("--out", default=None, help="results directory (default: bench/results)")
    bench.add_argument("--compare", metavar="PREVIOUS.json", help="fail if a fused speed-up fell by > 15%%")
    bench.add_argument("-k", dest="select", default=None, help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--pretrain", action="store_true",
                       help="instead: run the default `electra-fast pretrain` job and record its summary")
    train_cli.add_parsers(sub)
    finetune_cli.add_parser(sub)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the sub-command, whose --help lists what it takes
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:  # a misspelt ELECTRA_FAST_BACKEND is the user's mistake: one line, before any command starts
        from ._backend import forced_backend
        forced_backend()
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    train_cli.expand_user(args)
    # info's and the demo's output is their work; another command's summary it could not print does not undo its
    # work. argv None: the process's own command line (the console script, python -m), which exits next
    return settle_stdout(f"electra-fast {args.command}", _command(args),
                         output_is_the_work=args.command in ("info", "demo"), exiting=argv is None)


def _command(args) -> int:
    from .finetune import cli as finetune_cli
    from .train import cli as train_cli
    if args.command == "finetune":
        return train_cli.guard(args, lambda: finetune_cli.run(args))
    if args.command in train_cli.COMMANDS:
        return train_cli.run(args)
    if args.command == "info":
        from .info import main as info_main
        return info_main()
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(args)
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
