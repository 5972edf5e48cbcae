"""The ``electra-fast`` command (also ``python -m electra_fast``)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="electra-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extension status and which backend serves each op")
    sub.add_parser("demo", help="run the RTD-loss op on every available backend")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        return info_main()
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
