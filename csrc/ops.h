// Registration hooks of the fused ops: each csrc/<op>.cpp adds its functions to sdk._C.
#pragma once

#include <pybind11/pybind11.h>

namespace moon3 {

void register_l2norm(pybind11::module_& m);
void register_fused(pybind11::module_& m);
void register_head(pybind11::module_& m);

}  // namespace moon3
