#include <pybind11/pybind11.h>
int this_is_not_cpp( { return ${offset}; }
