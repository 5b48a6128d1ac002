"""Build hook for the optional native sealing module (records/_seal.c).

Everything else lives in pyproject.toml. WARDEN_PURE=1 builds a pure-Python wheel (used by
`make packages` for Pythons it cannot compile for); without the module, records.codec falls
back to its Python encoder, which produces the same bytes.
"""
import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("WARDEN_PURE") != "1":
    ext_modules.append(Extension(
        "records._seal", ["records/_seal.c"], libraries=["crypto"],
        extra_compile_args=["-O2", "-Wall", "-Wno-deprecated-declarations"]))

setup(ext_modules=ext_modules)
