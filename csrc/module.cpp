// Python entry point of the extension: importing `slao_kernels._C` loads this
// shared library, whose static initializers register the CPU kernels with the
// dispatcher (TORCH_LIBRARY_IMPL in the other translation units).
#include <Python.h>

static struct PyModuleDef slao_module = {PyModuleDef_HEAD_INIT, "_C", "slao_kernels CPU kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&slao_module); }
