// Placeholder module so the package builds before the engine lands (issue 3 replaces this file).
#include <nanobind/nanobind.h>
namespace nb = nanobind;
NB_MODULE(_cpu, m) { m.def("engine_abi", []() { return 0; }); }
