"""`python -m bench`: run the benchmark suite and print its summary table.

    python -m bench                          full sizes (about 8 minutes on 2 cores)
    python -m bench --smoke                  small sizes, every workload once (under a minute)
    python -m bench --benchmark-json out.json    pytest-benchmark's JSON, with every figure, ratio,
                                             target and the server settings under "skiplock"
    python -m bench -k latency               any other pytest argument is passed through
    python -m bench --show [PATH]            print the table of a results file (default: the latest
                                             full run, bench/results/latest.json); --markdown for README

The suite starts its own PostgreSQL (default durability) unless SKIPLOCK_DSN names a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def markdown(report: dict) -> str:
    from bench.conftest import _fmt

    lines = ["| figure | value | ceiling | ratio | goal | result |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in report["targets"]:
        ceiling = f"{_fmt(row['ceiling'])} ({row['ceiling_name']})" if row["ceiling"] is not None else ""
        ratio = f"{row['ratio']:.0%}" if row["ratio"] is not None else ""
        goal = "" if row["goal"] is None else (f"<= {row['goal']:g}" if row["lower_is_better"] else f">= {row['goal']:.0%}")
        result = {None: "", True: "pass", False: "**MISS**"}[row["passed"]]
        lines.append(f"| {row['name'].strip()} | {_fmt(row['value'])} {row['unit']} | {ceiling} | {ratio} | {goal} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes (SKIPLOCK_BENCH_SMOKE=1)")
    parser.add_argument("--show", nargs="?", const=str(HERE / "results" / "latest.json"), metavar="PATH",
                        help="print the table of a results JSON instead of running")
    parser.add_argument("--markdown", action="store_true", help="with --show: a Markdown table")
    args, passthrough = parser.parse_known_args(argv)
    if args.show:
        report = json.loads(Path(args.show).read_text())
        report = report.get("skiplock", report)  # a --benchmark-json file holds it under "skiplock"
        if args.markdown:
            print(markdown(report))
        else:
            from bench.conftest import table_lines

            print("\n".join(table_lines(report)))
        return 0
    if args.smoke:
        os.environ["SKIPLOCK_BENCH_SMOKE"] = "1"
    import pytest

    return int(pytest.main([str(HERE), "-p", "no:cacheprovider", "-q", *passthrough]))


if __name__ == "__main__":
    sys.exit(main())
