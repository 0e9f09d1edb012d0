// The Python side of the fused ops: float32 C-contiguous array arguments (`Arr`) and the checks
// that name a wrong argument's shape. The kernels they feed (csrc/kernels.h) know nothing of Python.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace moon3 {
namespace kern {

namespace py = pybind11;
using Arr = py::array_t<float, py::array::c_style | py::array::forcecast>;

// "(2, 3)", "(4,)": an array's shape as Python prints it.
inline std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

inline void expect(const Arr& a, const char* name, std::initializer_list<i64> shape) {
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    py::ssize_t k = 0;
    for (i64 s : shape) ok = ok && a.shape(k++) == s;
    if (!ok) {
        std::string want = "(";
        k = 0;
        for (i64 s : shape) want += (k++ ? ", " : "") + std::to_string(s);
        throw std::invalid_argument(std::string(name) + " must have shape " + want + (shape.size() == 1 ? ",)" : ")") +
                                    ", got " + shape_str(a));
    }
}

}  // namespace kern
}  // namespace moon3
