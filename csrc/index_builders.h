/* Copyright (c) 2025, megasyne authors.
 *
 * Builders for the mixture + curriculum sample index (megasyne/data/mixture.py).
 * Style of Megatron-Core's datasets/helpers.cpp: unchecked numpy views, no Python
 * objects inside the loops, the GIL released while they run, and results returned
 * as numpy arrays that own their memory through a capsule.
 *
 * These functions trust their inputs' shapes and dtypes: the Python wrapper
 * megasyne/data/index_builders.py checks shapes, dtypes and bounds first. They
 * still throw std::invalid_argument (-> ValueError) on values that would make
 * them write out of bounds.
 */
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace megasyne {

namespace py = pybind11;

// Bump when any builder's output for the same input changes: it is part of the
// index cache fingerprint, so a changed algorithm never reuses an old cache.
constexpr const char *kIndexAlgoVersion = "blend-v2-fixed52/sample-index-v1";

// Wrap a heap buffer into a 1-D or 2-D C-contiguous numpy array that frees it.
template <typename T>
py::array_t<T> owning_array(std::unique_ptr<T[]> data, std::vector<int64_t> shape) {
  T *raw = data.release();
  py::capsule free_when_done(raw, [](void *p) { delete[] reinterpret_cast<T *>(p); });
  std::vector<int64_t> strides(shape.size());
  int64_t stride = sizeof(T);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= shape[d];
  }
  return py::array_t<T>(shape, strides, raw, free_when_done);
}

// Same for a heap vector (its size must be the product of shape).
template <typename T>
py::array_t<T> owning_vector_array(std::unique_ptr<std::vector<T>> data, std::vector<int64_t> shape) {
  std::vector<T> *raw = data.release();
  py::capsule free_when_done(raw, [](void *p) { delete reinterpret_cast<std::vector<T> *>(p); });
  std::vector<int64_t> strides(shape.size());
  int64_t stride = sizeof(T);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= shape[d];
  }
  return py::array_t<T>(shape, strides, raw->data(), free_when_done);
}

void register_blend(py::module_ &m);
void register_sample_index(py::module_ &m);

}  // namespace megasyne
