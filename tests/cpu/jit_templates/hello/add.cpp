// A host-only module for the JIT tests: pybind11 only (no torch headers) so each build takes seconds.
#include <pybind11/pybind11.h>
#include "hello/offset.h"

int add_offset(int x) { return x + ${offset} + kExtra; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("add_offset", &add_offset); }
