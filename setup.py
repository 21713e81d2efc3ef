"""Only the optional C extension lives here; everything else is in pyproject.toml.

eir._lookup speeds up the exact-IMEI search (eir.snapshot). It is optional: without a C
compiler or Python headers the build prints a warning, the install goes on, and eir.snapshot
uses its pure-Python search.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("eir._lookup", ["eir/_lookup.c"], optional=True)])
