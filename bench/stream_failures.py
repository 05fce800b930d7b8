"""A pytest plugin for the GPU check: each failure's report is appended to $STREAM_FAILURES the
moment it arrives (under xdist, in the controller), so a test stage stopped at its time limit
still brings back the names and tracebacks of what failed so far.

    STREAM_FAILURES=failures.txt PYTHONPATH=bench python -m pytest -p stream_failures tests
"""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("STREAM_FAILURES")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as out:
        out.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
