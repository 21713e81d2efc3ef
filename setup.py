"""Only the optional C extension lives here; everything else is in pyproject.toml.

eir.lists._lookup speeds up the exact-IMEI search (eir.lists.snapshot). It is optional: without a C
compiler or Python headers the build prints a warning, the install goes on, and eir.lists.snapshot
uses its pure-Python search.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("eir.lists._lookup", ["eir/lists/_lookup.c"], optional=True)])
