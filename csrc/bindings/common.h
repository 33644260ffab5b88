// Helpers shared by the binding files: buffer checks that name the argument.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "common/error.h"

namespace py = pybind11;

namespace dovetail::bind {

// A C-contiguous numpy view of `obj` with dtype T; refuses other dtypes instead of copying
// silently (a wrong dtype is usually a caller bug).
template <typename T>
py::array_t<T, py::array::c_style> as_array(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  DT_CHECK(arr, std::string(name) + " must be an array (numpy array or CPU tensor)");
  DT_CHECK(arr.dtype().is(py::dtype::of<T>()),
           std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
               ", got " + std::string(py::str(arr.dtype())));
  return py::array_t<T, py::array::c_style>::ensure(arr);
}

inline void check_shape(const py::array& a, const std::vector<long>& want, const char* name) {
  bool ok = a.ndim() == (py::ssize_t)want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || a.shape(i) == want[i];
  if (ok) return;
  std::string got = "(", exp = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
  for (size_t i = 0; i < want.size(); ++i)
    exp += (i ? ", " : "") + (want[i] < 0 ? std::string("*") : std::to_string(want[i]));
  throw_value_error(std::string(name) + " has shape " + got + "), expected " + exp + ")");
}

// A [T, W] ancestor matrix given as bool or uint8 (shape and dtype checked).
py::array_t<uint8_t, py::array::c_style> ancestor_matrix(const py::handle& obj, int64_t T, int64_t W);

void bind_ops(py::module_& m);
void bind_engine(py::module_& m);
void bind_davit(py::module_& m);

}  // namespace dovetail::bind
