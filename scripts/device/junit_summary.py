"""Summarise the junit XML files of GPU test runs into one JSON record (benchmarks/results/gpu_tests_h200.json).

    python3 scripts/device/junit_summary.py --out benchmarks/results/gpu_tests_h200.json \\
        --meta gpu="NVIDIA H200" --meta torch=2.11.0+cu130 \\
        8a2e381:call1:/tmp/r3/test_sparse_gpu.xml 8a2e381:rerun:/tmp/r3/test_gpu_rerun.xml ...

Each positional argument is COMMIT:RUN:XML. Later arguments win for the same test: the summary gives every
test's last outcome (and where it ran), and ``history`` keeps each run's outcome. ``--base`` starts from an
earlier record of this script (its tests, histories and runs), so a later session adds its runs to it.
"""
import argparse
import json
import re
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
        try:
            seconds = float(case.get("time") or 0)
        except ValueError:  # a junit writer with another number format: the outcome still counts
            seconds = 0.0
        yield name, outcome, seconds, message


def still_in_suite(name: str, tests_dir: Path) -> bool:
    """Whether the test ``tests.test_file::test_name[params]`` still has its function in ``tests_dir``."""
    module, _, function = name.partition("::")
    function = function.split("[", 1)[0]
    for part in module.split("."):  # tests.test_x or tests.test_x.TestClass: the file is the test_x part
        path = tests_dir / f"{part}.py"
        if path.is_file():
            try:
                return re.search(rf"^\s*def {re.escape(function)}\(", path.read_text(), re.M) is not None
            except OSError:
                return False
    return False


def _base_problem(base) -> str | None:
    """None when ``base`` has this script's record shape, else what is wrong (one line)."""
    if not isinstance(base, dict):
        return f"a JSON {type(base).__name__}, not an object"
    if not isinstance(base.get("runs"), list) or not all(isinstance(r, str) for r in base["runs"]):
        return "'runs' is not a list of COMMIT:RUN:XML strings"
    if not isinstance(base.get("tests"), list):
        return "'tests' is not a list"
    for row in base["tests"]:
        if not (isinstance(row, dict) and isinstance(row.get("test"), str) and isinstance(row.get("outcome"), str)
                and isinstance(row.get("history"), list) and all(isinstance(h, str) for h in row["history"])):
            return f"a test row without a string 'test', a string 'outcome' and a list 'history' of strings: {str(row)[:120]}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="COMMIT:RUN:XML, in the order they ran")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="a field recorded as it is (repeat the flag for more); not runs/tests/note/date_utc")
    p.add_argument("--note", default="")
    p.add_argument("--base", type=Path, default=None, help="an earlier record to extend (its last outcomes and histories)")
    p.add_argument("--tests-dir", type=Path, default=None,
                   help="the test suite's folder (e.g. tests): tests whose function is no longer in it move to "
                        "'removed_tests' and leave the summary")
    args = p.parse_args()
    if args.tests_dir is not None and not args.tests_dir.is_dir():
        p.error(f"--tests-dir {args.tests_dir} is not a folder")
    meta = {}
    for kv in args.meta:
        key, sep, value = kv.partition("=")
        if not sep or not key or key in ("runs", "tests", "note", "date_utc", "summary_last_outcome"):
            p.error(f"--meta takes KEY=VALUE with a KEY other than the record's own fields, got {kv!r}")
        meta[key] = value
    if args.out.is_dir() or not args.out.parent.is_dir():
        p.error(f"--out {args.out}: give a file path in an existing folder")
    last, history, earlier, carried = {}, {}, [], {}
    if args.base is not None:
        try:
            base = json.loads(args.base.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--base {args.base} cannot be read as JSON: {exc}")
        problem = _base_problem(base)
        if problem:
            p.error(f"--base {args.base} is not a record of this script: {problem}")
        earlier = list(base["runs"])
        for row in base.get("removed_tests") or []:  # a test added back keeps its earlier history
            if isinstance(row, dict) and isinstance(row.get("test"), str) and isinstance(row.get("history"), list):
                history[row["test"]] = list(row["history"])
        for row in base["tests"]:
            history[row["test"]] = list(row["history"])
            last[row["test"]] = {k: v for k, v in row.items() if k not in ("test", "history")}
        # the base's own fields (gpu, torch, command, ..., note) carry over unless --meta / --note replace them
        carried = {k: v for k, v in base.items() if k not in ("runs", "tests", "date_utc", "summary_last_outcome")}
    for spec in args.runs:
        commit, _, rest = spec.partition(":")
        run, _, xml = rest.partition(":")
        if not (commit and run and xml):
            p.error(f"each run is COMMIT:RUN:XML (e.g. 8a2e381:call1:test_gpu.xml), got {spec!r}")
        try:
            cases = list(outcomes(Path(xml)))
        except (OSError, ET.ParseError) as exc:
            p.error(f"cannot read the junit file of {spec!r}: {exc}")
        if not cases:
            p.error(f"{xml} holds no test case (a run stopped before pytest wrote its results?)")
        for name, outcome, seconds, message in cases:
            row = {"outcome": outcome, "seconds": round(seconds, 3), "commit": commit, "run": run}
            if message:
                row["message"] = message
            last[name] = row
            history.setdefault(name, []).append(f"{run}@{commit}: {outcome}")
    removed = {}
    if args.tests_dir is not None:
        removed = {name: row for name, row in last.items() if not still_in_suite(name, args.tests_dir)}
        last = {name: row for name, row in last.items() if name not in removed}
    summary = {}
    for row in last.values():
        summary[row["outcome"]] = summary.get(row["outcome"], 0) + 1
    earlier_removed = [r for r in carried.pop("removed_tests", None) or [] if isinstance(r, dict)]
    note = args.note if args.note else carried.pop("note", "")
    carried.pop("note", None)
    record = {
        **carried,
        **meta,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": earlier + args.runs,
        "summary_last_outcome": summary,
        "note": note,
        "tests": [{"test": k, **v, "history": history[k]} for k, v in sorted(last.items())],
    }
    removed = {**{row["test"]: row for row in earlier_removed if row.get("test") not in last}, **{
        k: {"test": k, **v, "history": history[k]} for k, v in removed.items()}}
    if removed:
        record["removed_tests"] = [removed[k] for k in sorted(removed)]
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
