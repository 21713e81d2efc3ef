"""Only the optional C extension lives here; everything else is in pyproject.toml.

eir.lists._lookup speeds up the exact-IMEI search (eir.lists.snapshot, _lookup.c) and answers
plain S13 ECRs without the generic Diameter path (eir.interfaces.s13, _ecr.c). It is optional:
without a C compiler or Python headers the build prints a warning, the install goes on,
eir.lists.snapshot uses its pure-Python search and every request takes the generic path.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "eir.lists._lookup", ["eir/lists/_lookup.c", "eir/lists/_ecr.c"],
    depends=["eir/lists/_lookup.h"], optional=True)])
