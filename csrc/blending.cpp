// Blended dataset indices: which dataset, and which of its samples, fills each slot of a mixture.
//
// Greedy and deterministic (the scheme of Megatron's helpers): slot i goes to the dataset whose
// share so far lags its weight the most, so every prefix of the mixture is within one sample per
// dataset of the target proportions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

py::tuple build_blending_indices(const std::vector<double>& weights, int64_t size) {
  const int64_t n = static_cast<int64_t>(weights.size());
  if (n == 0) throw std::invalid_argument("build_blending_indices: no datasets");
  double total = 0.0;
  for (int64_t d = 0; d < n; ++d) {
    if (!(weights[d] >= 0.0)) {
      throw std::invalid_argument("build_blending_indices: weight " + std::to_string(d) + " is negative");
    }
    total += weights[d];
  }
  if (total <= 0.0) throw std::invalid_argument("build_blending_indices: weights sum to zero");

  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> sample_index(size);
  auto ds = dataset_index.mutable_unchecked<1>();
  auto ss = sample_index.mutable_unchecked<1>();
  std::vector<int64_t> taken(n, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double done = static_cast<double>(i + 1);
    int64_t best = 0;
    double best_lag = -1e300;
    for (int64_t d = 0; d < n; ++d) {
      const double lag = weights[d] / total * done - static_cast<double>(taken[d]);
      if (lag > best_lag) {
        best_lag = lag;
        best = d;
      }
    }
    ds(i) = static_cast<int16_t>(best);
    ss(i) = taken[best]++;
  }
  return py::make_tuple(dataset_index, sample_index);
}

void register_blending(py::module_& m) {
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index int16[size], sample_index int64[size]) of a weighted mixture; sample_index "
        "counts within each dataset (wrap it modulo the dataset's size).");
}
