/* What eir/lists/_lookup.c shares with the other sources of the eir.lists._lookup module
 * (eir/lists/_ecr.c, the S13 ECR fast path). */
#ifndef EIR_LOOKUP_H
#define EIR_LOOKUP_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* `lookup` is the bound lookup() method of an ExactIndex (Snapshot.hot_lookup when the C
 * search serves): its index (a borrowed reference), else NULL. */
PyObject *eir_exact_index_of(PyObject *lookup);

/* ExactIndex.lookup(imei, imsi, day) called from C, on an index eir_exact_index_of gave. */
PyObject *eir_exact_lookup(PyObject *index, PyObject *const *args, Py_ssize_t nargs);

/* The module-level functions of _ecr.c (answer_ecrs). */
extern PyMethodDef eir_ecr_methods[];

#endif
