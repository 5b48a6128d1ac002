"""Build hook for the optional native modules: records/_seal.c (event sealing),
enforcer/masking/_pgrows.c (the DataRow masking loop) and enforcer/postgres/_pglanes.c (the
Postgres session's steady-state message loops).

Everything else lives in pyproject.toml. WARDEN_PURE=1 builds a pure-Python wheel (used by
`make packages` for Pythons it cannot compile for); without the modules, records.codec,
enforcer.masking.pgrow and enforcer.postgres.session fall back to their Python code, which
gives the same results.
"""
import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("WARDEN_PURE") != "1":
    ext_modules.append(Extension(
        "records._seal", ["records/_seal.c"], libraries=["crypto"],
        extra_compile_args=["-O2", "-Wall", "-Wno-deprecated-declarations"]))
    ext_modules.append(Extension(
        "enforcer.masking._pgrows", ["enforcer/masking/_pgrows.c"],
        extra_compile_args=["-O2", "-Wall"]))
    ext_modules.append(Extension(
        "enforcer.postgres._pglanes", ["enforcer/postgres/_pglanes.c"],
        extra_compile_args=["-O2", "-Wall"]))

setup(ext_modules=ext_modules)
