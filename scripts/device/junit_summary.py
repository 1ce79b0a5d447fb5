"""Summarise the junit XML files of GPU test runs into one JSON record (benchmarks/results/gpu_tests_h200.json).

    python3 scripts/device/junit_summary.py --out benchmarks/results/gpu_tests_h200.json \\
        --meta gpu="NVIDIA H200" torch=2.11.0+cu130 \\
        8a2e381:call1:/tmp/r3/test_gpu.xml 8a2e381:rerun:/tmp/r3/test_gpu_rerun.xml ...

Each positional argument is COMMIT:RUN:XML. Later arguments win for the same test: the summary gives every
test's last outcome (and where it ran), and ``history`` keeps each run's outcome.
"""
import argparse
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(path: Path):
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                message = (el.get("message") or "")[:300]
                outcome = {"failure": "failed", "error": "error"}.get(tag, "skipped")
                if tag == "skipped" and el.get("type") == "pytest.xfail":
                    outcome = "xfailed"
        yield name, outcome, float(case.get("time") or 0), message


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="COMMIT:RUN:XML, in the order they ran")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--meta", nargs="*", default=[], help="KEY=VALUE pairs recorded as they are")
    p.add_argument("--note", default="")
    args = p.parse_args()
    last, history = {}, {}
    for spec in args.runs:
        commit, run, xml = spec.split(":", 2)
        for name, outcome, seconds, message in outcomes(Path(xml)):
            row = {"outcome": outcome, "seconds": round(seconds, 3), "commit": commit, "run": run}
            if message:
                row["message"] = message
            last[name] = row
            history.setdefault(name, []).append(f"{run}@{commit}: {outcome}")
    summary = {}
    for row in last.values():
        summary[row["outcome"]] = summary.get(row["outcome"], 0) + 1
    record = {
        **dict(kv.split("=", 1) for kv in args.meta),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": args.runs,
        "summary_last_outcome": summary,
        "note": args.note,
        "tests": [{"test": k, **v, "history": history[k]} for k, v in sorted(last.items())],
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
