"""One Markdown table from a pytest-benchmark JSON file of the op microbenchmarks
(``test_ops_benchmark.py``): a row per op x passes x shape x dtype x device, the three
implementations side by side, with the fused op's speed-ups and the roofline columns kept in
``extra_info`` (achieved GB/s, % of the copy bandwidth of the same session, peak extra MiB).

    pytest bench --benchmark-only --benchmark-json=ops.json
    python bench/report_benchmarks.py ops.json [--markdown table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table  # noqa: E402

IMPLS = ("fused", "eager", "compiled")
KEYS = ("op", "passes", "shape", "dtype", "device")


def rows_of(report: dict) -> list[list[str]]:
    """The table's rows: medians in ms per implementation, fused / eager and fused / compiled
    speed-ups, and each implementation's GB/s, % of copy and peak extra MiB (fused / eager /
    compiled)."""
    cases: dict[tuple, dict[str, dict]] = {}
    for bench in report["benchmarks"]:
        params = bench["params"]
        cases.setdefault(tuple(params[k] for k in KEYS), {})[params["impl"]] = bench
    rows = []
    for key in sorted(cases):
        by_impl = cases[key]
        median = {impl: by_impl[impl]["stats"]["median"] for impl in IMPLS if impl in by_impl}

        def cell(impl: str, fmt: str, value) -> str:
            return fmt.format(value(by_impl[impl])) if impl in by_impl else ""

        def speedup(other: str) -> str:
            return f"{median[other] / median['fused']:.2f}x" if "fused" in median and other in median else ""

        def extras(name: str, fmt: str) -> str:
            return " / ".join(cell(impl, fmt, lambda b: b["extra_info"][name]) or "-" for impl in IMPLS)

        rows.append([*key, *(cell(impl, "{:.3f}", lambda b: 1e3 * b["stats"]["median"]) for impl in IMPLS),
                     speedup("eager"), speedup("compiled"), extras("GB/s", "{:.1f}"), extras("% of copy", "{:.0f}"),
                     extras("peak extra MiB", "{:.1f}")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="the file of --benchmark-json")
    parser.add_argument("--markdown", type=Path, help="also write the table there")
    args = parser.parse_args()
    report = json.loads(args.json.read_text())
    machine = report.get("machine_info", {})
    header = ["op", "passes", "shape BxCxHxWxK", "dtype", "device", "fused ms", "eager ms", "compiled ms",
              "vs eager", "vs compiled", "GB/s (f / e / c)", "% of copy (f / e / c)", "peak extra MiB (f / e / c)"]
    table = markdown_table(header, rows_of(report))
    title = (f"{machine.get('cpu', {}).get('brand_raw', '?')}, python {machine.get('python_version', '?')}, "
             f"commit {report.get('commit_info', {}).get('id', '?')[:7]}, {report.get('datetime', '?')[:10]}")
    print(f"{title}\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"{title}\n\n{table}\n")


if __name__ == "__main__":
    main()
