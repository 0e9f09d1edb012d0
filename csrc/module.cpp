#include <pybind11/pybind11.h>

#include "ops.h"

#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "moon3-sdk fused ops (private; use sdk.ops)";
#ifdef VERSION_INFO
    m.attr("__version__") = MACRO_STRINGIFY(VERSION_INFO);
#else
    m.attr("__version__") = "dev";
#endif
    moon3::register_l2norm(m);
    moon3::register_fused(m);
    moon3::register_head(m);
}
