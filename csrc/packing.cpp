// Sequence packing: assign variable-length samples to fixed token budgets.
//
// Best-fit decreasing: samples are taken longest first (ties by index, so the result is
// deterministic) and each goes into the open bin with the least room that still fits it.
// A multiset keyed by remaining room makes every placement O(log bins).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

std::vector<std::vector<int64_t>> pack_best_fit(const std::vector<int64_t>& lengths, int64_t budget) {
  if (budget <= 0) throw std::invalid_argument("pack_best_fit: budget must be positive");
  const int64_t n = static_cast<int64_t>(lengths.size());
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0 || lengths[i] > budget) {
      throw std::invalid_argument("pack_best_fit: sample " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + ", outside (0, budget=" +
                                  std::to_string(budget) + "]");
    }
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<int64_t>> bins;
  std::multiset<std::pair<int64_t, int64_t>> room;  // (remaining tokens, bin index)
  for (int64_t idx : order) {
    const int64_t len = lengths[idx];
    auto it = room.lower_bound({len, -1});
    if (it == room.end()) {
      bins.push_back({idx});
      room.insert({budget - len, static_cast<int64_t>(bins.size()) - 1});
    } else {
      const auto [left, bin] = *it;
      room.erase(it);
      bins[bin].push_back(idx);
      room.insert({left - len, bin});
    }
  }
  return bins;
}

// First-fit in arrival order: keeps the data order (for curriculum) at some padding cost.
std::vector<std::vector<int64_t>> pack_first_fit(const std::vector<int64_t>& lengths, int64_t budget) {
  if (budget <= 0) throw std::invalid_argument("pack_first_fit: budget must be positive");
  std::vector<std::vector<int64_t>> bins;
  std::vector<int64_t> left;
  for (int64_t i = 0; i < static_cast<int64_t>(lengths.size()); ++i) {
    const int64_t len = lengths[i];
    if (len <= 0 || len > budget) {
      throw std::invalid_argument("pack_first_fit: sample " + std::to_string(i) + " has length " +
                                  std::to_string(len) + ", outside (0, budget=" +
                                  std::to_string(budget) + "]");
    }
    size_t b = 0;
    while (b < left.size() && left[b] < len) ++b;
    if (b == left.size()) {
      bins.push_back({});
      left.push_back(budget);
    }
    bins[b].push_back(i);
    left[b] -= len;
  }
  return bins;
}

}  // namespace

void register_blending(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "megavlm C++ helpers";
  register_blending(m);
  m.def("pack_best_fit", &pack_best_fit, py::arg("lengths"), py::arg("budget"),
        "Best-fit-decreasing packing of sample lengths into bins of `budget` tokens; "
        "returns a list of bins, each a list of sample indices.");
  m.def("pack_first_fit", &pack_first_fit, py::arg("lengths"), py::arg("budget"),
        "First-fit packing in arrival order; returns a list of bins of sample indices.");
}
