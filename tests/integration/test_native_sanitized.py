"""The C modules built with ASan and UBSan pass their unit tests and the fuzz targets
(`python -m tests.sanitize --quick`), and the runner does catch a memory error."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import sanitize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_sanitize(*args: str, timeout: int) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, "-m", "tests.sanitize", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    out = done.stdout + done.stderr
    result = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return done.returncode, json.loads(result[-1][len("RESULT "):]) if result else {}, out


@pytest.mark.timeout(1200)
def test_c_modules_pass_their_tests_and_the_fuzzers_under_asan_and_ubsan():
    code, result, out = run_sanitize("--quick", timeout=1150)
    assert code == 0, out[-8000:]
    assert result["ok"] and result["unit_test_files"] >= 10
    assert [(s["step"], s["returncode"], s["sanitizer_reports"]) for s in result["steps"]] == [
        ("unit tests", 0, 0), ("fuzz", 0, 0)]


def test_an_out_of_bounds_read_in_a_c_module_is_reported(tmp_path):
    """A sanitized build of a module that reads one byte past a bytes object: the environment
    the runner gives its steps must turn that into a report and a failed step."""
    source = tmp_path / "_oob.c"
    source.write_text(
        "#define PY_SSIZE_T_CLEAN\n#include <Python.h>\n"
        "static PyObject *peek(PyObject *m, PyObject *b) {\n"
        "    const char *s = PyBytes_AS_STRING(b);\n"
        "    return PyLong_FromLong(s[PyBytes_GET_SIZE(b) + 1]);\n}\n"
        "static PyMethodDef methods[] = {{\"peek\", peek, METH_O, NULL}, {NULL}};\n"
        "static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, \"_oob\", NULL, -1, methods};\n"
        "PyMODINIT_FUNC PyInit__oob(void) { return PyModule_Create(&mod); }\n")
    include = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["gcc", "-shared", "-fPIC", *sanitize.SANITIZE.split(), "-g", "-O1", f"-I{include}",
                    str(source), "-o", str(tmp_path / "_oob.so")], check=True)
    reports = str(tmp_path / "report")
    step = sanitize.run_step("oob", ["-c", "import _oob; _oob.peek(b'x' * 40)"], str(tmp_path),
                             sanitize.sanitized_env(reports), reports)
    assert step["sanitizer_reports"] == 1 and not step["ok"]
