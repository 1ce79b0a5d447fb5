"""scripts/device/junit_summary.py: the GPU test record is built from junit files and extended across sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "device" / "junit_summary.py"

XML = """<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_one" time="1.5"/>
<testcase classname="tests.test_a" name="test_two" time="1,5"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_record_is_extended_with_base_and_keeps_its_fields(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(XML)
    first = tmp_path / "first.json"
    assert _run("--out", first, "--meta", "gpu=H200", "--note", "first", f"c1:s1:{xml}").returncode == 0
    rec = json.loads(first.read_text())
    assert rec["summary_last_outcome"] == {"passed": 1, "failed": 1} and rec["gpu"] == "H200"
    xml.write_text(XML.replace('<failure message="boom"/>', ""))
    second = tmp_path / "second.json"
    assert _run("--base", first, "--out", second, f"c2:s2:{xml}").returncode == 0
    rec = json.loads(second.read_text())
    assert rec["gpu"] == "H200" and rec["note"] == "first"  # carried over
    assert rec["summary_last_outcome"] == {"passed": 2} and rec["runs"] == [f"c1:s1:{xml}", f"c2:s2:{xml}"]
    two = next(t for t in rec["tests"] if t["test"].endswith("test_two"))
    assert two["history"] == ["s1@c1: failed", "s2@c2: passed"] and two["commit"] == "c2"


def test_bad_base_and_out_are_named(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(XML)
    for content in ('{"runs": "abc", "tests": []}', '{"runs": [], "tests": [{"test": "x"}]}', "[1]", "not json"):
        base = tmp_path / "base.json"
        base.write_text(content)
        r = _run("--base", base, "--out", tmp_path / "o.json", f"c:r:{xml}")
        assert r.returncode == 2 and "--base" in r.stderr and "Traceback" not in r.stderr
    r = _run("--out", tmp_path / "missing" / "o.json", f"c:r:{xml}")
    assert r.returncode == 2 and "--out" in r.stderr
    assert not (tmp_path / "o.json").exists()


def test_tests_no_longer_in_the_suite_leave_the_summary(tmp_path):
    """--tests-dir: a recorded test whose function was deleted moves to removed_tests, out of the totals."""
    xml = tmp_path / "a.xml"
    xml.write_text(XML)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_a.py").write_text("def test_one():\n    pass\n")  # test_two was deleted
    out = tmp_path / "o.json"
    assert _run("--out", out, "--tests-dir", suite, f"c1:s1:{xml}").returncode == 0
    rec = json.loads(out.read_text())
    assert rec["summary_last_outcome"] == {"passed": 1} and [t["test"] for t in rec["tests"]] == ["tests.test_a::test_one"]
    assert [t["test"] for t in rec["removed_tests"]] == ["tests.test_a::test_two"]
    again = tmp_path / "again.json"  # kept when the record is extended later
    assert _run("--base", out, "--out", again, "--tests-dir", suite, f"c2:s2:{xml}").returncode == 0
    assert [t["test"] for t in json.loads(again.read_text())["removed_tests"]] == ["tests.test_a::test_two"]
    r = _run("--out", out, "--tests-dir", tmp_path / "nope", f"c1:s1:{xml}")
    assert r.returncode == 2 and "--tests-dir" in r.stderr


def test_a_test_added_back_leaves_removed_tests_with_its_history(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(XML)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_a.py").write_text("def test_one():\n    pass\n")
    first = tmp_path / "first.json"
    assert _run("--out", first, "--tests-dir", suite, f"c1:s1:{xml}").returncode == 0
    (suite / "test_a.py").write_text("def test_one():\n    pass\n\n\ndef test_two():\n    pass\n")  # added back
    second = tmp_path / "second.json"
    assert _run("--base", first, "--out", second, "--tests-dir", suite, f"c2:s2:{xml}").returncode == 0
    rec = json.loads(second.read_text())
    assert "removed_tests" not in rec
    two = next(t for t in rec["tests"] if t["test"] == "tests.test_a::test_two")
    assert two["history"] == ["s1@c1: failed", "s2@c2: failed"]
