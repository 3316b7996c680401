// pybind11 bindings for erasus._C. Arrays arrive as numpy views of torch tensors and are used in place:
// every array argument is .noconvert() and checked here, so a wrong dtype or layout is an error, never a copy.
#include <limits>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "coreset.h"
#include "dual_sensitivity.h"
#include "element.h"
#include "squared_grad_sum.h"
#include "per_sample_grad_norms.h"
#include "parallel.h"

namespace py = pybind11;

namespace {

struct ArrayDTypeError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct ArrayLayoutError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct ArrayShapeError : std::invalid_argument { using std::invalid_argument::invalid_argument; };

enum class Elem { f32, f16, bf16 };

Elem parse_elem(const std::string& name) {
  if (name == "float32") return Elem::f32;
  if (name == "float16") return Elem::f16;
  if (name == "bfloat16") return Elem::bf16;
  throw ArrayDTypeError("element type must be float32, float16 or bfloat16, got '" + name + "'");
}

void require_layout(const py::array& a, const char* name, bool writeable) {
  if (!(a.flags() & py::array::c_style))
    throw ArrayLayoutError(std::string(name) + " must be C-contiguous (call .contiguous() first)");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw ArrayLayoutError(std::string(name) + " must be aligned to its element size");
  if (writeable && !a.writeable()) throw ArrayLayoutError(std::string(name) + " must be writeable");
}

// A float array argument: `ndim`-D, C-contiguous, with an element type that matches `elem`. bfloat16 has no
// numpy dtype, so it arrives as an int16/uint16 view of the same memory.
void check_floats(const py::array& x, const char* name, int ndim, const char* dims, Elem elem) {
  if (x.ndim() != ndim)
    throw ArrayShapeError(std::string(name) + " must be " + std::to_string(ndim) + "-D " + dims + ", got " +
                          std::to_string(x.ndim()) + "-D");
  const char kind = x.dtype().kind();
  const auto size = x.itemsize();
  bool ok = false;
  switch (elem) {
    case Elem::f32: ok = kind == 'f' && size == 4; break;
    case Elem::f16: ok = kind == 'f' && size == 2; break;
    case Elem::bf16: ok = (kind == 'i' || kind == 'u') && size == 2; break;
  }
  if (!ok)
    throw ArrayDTypeError(std::string(name) + " has numpy dtype '" + std::string(py::str(x.dtype())) +
                          "', which does not hold the declared element type");
  require_layout(x, name, false);
}

void check_matrix(const py::array& x, Elem elem) { check_floats(x, "x", 2, "(n, d)", elem); }

template <typename T>
void check_vector(const py::array& a, const char* name, int64_t length, bool writeable) {
  if (!py::isinstance<py::array_t<T>>(a) || a.dtype().itemsize() != sizeof(T))
    throw ArrayDTypeError(std::string(name) + " has numpy dtype '" + std::string(py::str(a.dtype())) + "', expected " +
                          std::string(py::str(py::dtype::of<T>())));
  if (a.ndim() != 1 || a.shape(0) != length)
    throw ArrayShapeError(std::string(name) + " must be 1-D of length " + std::to_string(length));
  require_layout(a, name, writeable);
}

// Calls f with a typed null pointer for the element type; f casts its arrays' data to that type.
template <typename F>
auto dispatch(Elem elem, F&& f) {
  switch (elem) {
    case Elem::f16: return f(static_cast<const erasus::half_bits*>(nullptr));
    case Elem::bf16: return f(static_cast<const erasus::bf16_bits*>(nullptr));
    default: return f(static_cast<const float*>(nullptr));
  }
}

template <typename T>
const T* data_as(const py::array& a, const T*) { return static_cast<const T*>(a.data()); }

// `scale` must be a positive finite power of two (see coreset.h); anything else is refused, not rounded.
void check_scale(double scale) {
  int exponent = 0;
  if (!(scale > 0.0) || !std::isfinite(scale) || std::frexp(scale, &exponent) != 0.5 ||
      static_cast<double>(static_cast<float>(scale)) != scale || static_cast<float>(scale) < FLT_MIN)
    throw ArrayShapeError("scale must be a power of two that is a normal float32, got " + std::to_string(scale));
}

// The checks shared by the coreset loops: x an (n, d) matrix of `elem` with n >= 1, out an int64 (k,) array
// with 1 <= k <= n (checked for dtype and layout by check_vector). Returns k.
int64_t check_selection(const py::array& x, Elem elem, const py::array& out) {
  check_matrix(x, elem);
  const int64_t n = x.shape(0);
  const int64_t k = out.ndim() == 1 ? out.shape(0) : -1;
  if (n < 1) throw ArrayShapeError("x must have at least one row");
  if (k < 1 || k > n) throw ArrayShapeError("out must be 1-D with 1 <= length <= n");
  check_vector<int64_t>(out, "out", k, true);
  return k;
}

// threads: 0 (OpenMP's maximum) or a positive count; fixed_team needs a positive count (see coreset.h).
void check_threads(int threads, bool fixed_team) {
  if (threads < 0 || (fixed_team && threads < 1))
    throw ArrayShapeError("threads must be " + std::string(fixed_team ? "positive with fixed_team" : "0 or positive") +
                          ", got " + std::to_string(threads));
}

float kcenter_greedy(const py::array& x, const std::string& elem_name, const py::array& init, py::array& out,
                     py::array& min_dist, double scale, bool prune, int threads, bool fixed_team,
                     bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  const int64_t k = check_selection(x, elem, out);
  const int64_t n = x.shape(0), d = x.shape(1);
  const int64_t n_init = init.ndim() == 1 ? init.shape(0) : -1;
  if (n_init < 1 || n_init > k) throw ArrayShapeError("init must be 1-D with 1 <= length <= len(out)");
  check_vector<int64_t>(init, "init", n_init, false);
  check_vector<float>(min_dist, "min_dist", n, true);
  const auto* init_ptr = static_cast<const int64_t*>(init.data());
  for (int64_t i = 0; i < n_init; ++i)
    if (init_ptr[i] < 0 || init_ptr[i] >= n) throw ArrayShapeError("init holds an index outside [0, n)");
  check_scale(scale);
  check_threads(threads, fixed_team);
  auto* out_ptr = static_cast<int64_t*>(out.mutable_data());
  auto* min_ptr = static_cast<float*>(min_dist.mutable_data());
  py::gil_scoped_release release;
  return dispatch(elem, [&](auto* tag) {
    return erasus::kcenter_greedy(data_as(x, tag), n, d, static_cast<float>(scale), init_ptr, n_init, k, out_ptr,
                                  min_ptr, prune, threads, fixed_team, vectorized);
  });
}

void herding(const py::array& x, const std::string& elem_name, py::array& out, py::array& selected, double scale,
             int threads, bool fixed_team, bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  const int64_t k = check_selection(x, elem, out);
  const int64_t n = x.shape(0), d = x.shape(1);
  check_vector<uint8_t>(selected, "selected", n, true);
  check_scale(scale);
  check_threads(threads, fixed_team);
  auto* out_ptr = static_cast<int64_t*>(out.mutable_data());
  auto* sel_ptr = static_cast<uint8_t*>(selected.mutable_data());
  py::gil_scoped_release release;
  dispatch(elem, [&](auto* tag) {
    erasus::herding(data_as(x, tag), n, d, static_cast<float>(scale), k, out_ptr, sel_ptr, threads, fixed_team,
                    vectorized);
  });
}

void row_distances(const py::array& x, const std::string& elem_name, const py::array& centre, py::array& out,
                   double scale, int threads, bool fixed_team, bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  check_matrix(x, elem);
  const int64_t n = x.shape(0), d = x.shape(1);
  check_vector<float>(centre, "centre", d, false);
  check_vector<float>(out, "out", n, true);
  check_scale(scale);
  check_threads(threads, fixed_team);
  const auto* centre_ptr = static_cast<const float*>(centre.data());
  auto* out_ptr = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  dispatch(elem, [&](auto* tag) {
    erasus::row_distances(data_as(x, tag), n, d, static_cast<float>(scale), centre_ptr, out_ptr, threads, fixed_team,
                          vectorized);
  });
}

py::tuple kcenter_step(const py::array& x, const std::string& elem_name, const py::array& centre, int64_t step,
                       py::array& min_dist, const py::object& owner, const py::object& to_centre, double scale,
                       int threads, bool fixed_team, bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  check_matrix(x, elem);
  const int64_t n = x.shape(0), d = x.shape(1);
  check_vector<float>(centre, "centre", d, false);
  check_vector<float>(min_dist, "min_dist", n, true);
  if (step < 0 || step > std::numeric_limits<int32_t>::max()) throw ArrayShapeError("step must be in [0, 2**31)");
  if (owner.is_none() != to_centre.is_none())
    throw ArrayShapeError("owner and to_centre go together (pruning) or are both None");
  int32_t* owner_ptr = nullptr;
  const float* to_centre_ptr = nullptr;
  if (!owner.is_none()) {
    if (!py::isinstance<py::array>(owner) || !py::isinstance<py::array>(to_centre))
      throw ArrayDTypeError("owner and to_centre must be numpy arrays (int32 and float32)");
    py::array owner_array = py::reinterpret_borrow<py::array>(owner);
    const py::array to_centre_array = py::reinterpret_borrow<py::array>(to_centre);
    check_vector<int32_t>(owner_array, "owner", n, true);
    const int64_t known = to_centre_array.ndim() == 1 ? to_centre_array.shape(0) : -1;
    check_vector<float>(to_centre_array, "to_centre", known, false);
    owner_ptr = static_cast<int32_t*>(owner_array.mutable_data());
    to_centre_ptr = static_cast<const float*>(to_centre_array.data());
    for (int64_t j = 0; j < n; ++j)
      if (owner_ptr[j] < -1 || owner_ptr[j] >= known)
        throw ArrayShapeError("owner holds a step outside [-1, len(to_centre))");
  }
  check_scale(scale);
  check_threads(threads, fixed_team);
  const auto* centre_ptr = static_cast<const float*>(centre.data());
  auto* min_ptr = static_cast<float*>(min_dist.mutable_data());
  float farthest = -2.f;
  int64_t index = -1;
  {
    py::gil_scoped_release release;
    index = dispatch(elem, [&](auto* tag) {
      return erasus::kcenter_step(data_as(x, tag), n, d, static_cast<float>(scale), centre_ptr,
                                  static_cast<int32_t>(step), min_ptr, owner_ptr, to_centre_ptr, &farthest, threads,
                                  fixed_team, vectorized);
    });
  }
  return py::make_tuple(index, farthest);
}

py::tuple herding_step(const py::array& x, const std::string& elem_name, const py::array& target,
                       const py::array& selected, double scale, int threads, bool fixed_team, bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  check_matrix(x, elem);
  const int64_t n = x.shape(0), d = x.shape(1);
  check_vector<float>(target, "target", d, false);
  check_vector<uint8_t>(selected, "selected", n, false);
  check_scale(scale);
  check_threads(threads, fixed_team);
  const auto* target_ptr = static_cast<const float*>(target.data());
  const auto* selected_ptr = static_cast<const uint8_t*>(selected.data());
  float nearest = std::numeric_limits<float>::infinity();
  int64_t index = -1;
  {
    py::gil_scoped_release release;
    index = dispatch(elem, [&](auto* tag) {
      return erasus::herding_step(data_as(x, tag), n, d, static_cast<float>(scale), target_ptr, selected_ptr,
                                  &nearest, threads, fixed_team, vectorized);
    });
  }
  return py::make_tuple(index, nearest);
}

int64_t row_nearest_mean(const py::array& x, const std::string& elem_name, double scale, int threads,
                         bool fixed_team, bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  check_matrix(x, elem);
  const int64_t n = x.shape(0), d = x.shape(1);
  if (n < 1) throw ArrayShapeError("x must have at least one row");
  check_scale(scale);
  check_threads(threads, fixed_team);
  py::gil_scoped_release release;
  return dispatch(elem, [&](auto* tag) {
    return erasus::row_nearest_mean(data_as(x, tag), n, d, static_cast<float>(scale), threads, fixed_team,
                                    vectorized);
  });
}

struct LayerDims {
  int64_t batch, steps, d, p;
};

// The inputs (batch, steps, d_in) and output gradients (batch, steps, d_out) of one linear layer.
LayerDims check_layer_pair(const py::array& a, const py::array& g, Elem elem) {
  check_floats(a, "a", 3, "(batch, steps, d_in)", elem);
  check_floats(g, "g", 3, "(batch, steps, d_out)", elem);
  if (g.shape(0) != a.shape(0) || g.shape(1) != a.shape(1))
    throw ArrayShapeError("a and g must agree on (batch, steps)");
  return {a.shape(0), a.shape(1), a.shape(2), g.shape(2)};
}

void per_sample_grad_norms(const py::array& a, const py::array& g, const std::string& elem_name, int path,
                           py::array& weight_out, py::array& bias_out) {
  const Elem elem = parse_elem(elem_name);
  const auto [batch, steps, d, p] = check_layer_pair(a, g, elem);
  if (path < 0 || path > 2) throw ArrayShapeError("path must be 0 (outer), 1 (ghost) or 2 (materialize)");
  if (path == 0 && steps != 1) throw ArrayShapeError("path 0 (outer) needs steps == 1");
  check_vector<float>(weight_out, "weight_out", batch, true);
  check_vector<float>(bias_out, "bias_out", batch, true);
  auto* w_ptr = static_cast<float*>(weight_out.mutable_data());
  auto* b_ptr = static_cast<float*>(bias_out.mutable_data());
  py::gil_scoped_release release;
  dispatch(elem, [&](auto* tag) {
    erasus::per_sample_grad_norms(data_as(a, tag), data_as(g, tag), batch, steps, d, p,
                                  static_cast<erasus::NormPath>(path), w_ptr, b_ptr);
  });
}

void squared_grad_sum(const py::array& a, const py::array& g, const std::string& elem_name, py::array& weight_out,
                      py::array& bias_out) {
  const Elem elem = parse_elem(elem_name);
  const auto [batch, steps, d, p] = check_layer_pair(a, g, elem);
  check_floats(weight_out, "weight_out", 2, "(d_out, d_in)", Elem::f32);
  if (weight_out.shape(0) != p || weight_out.shape(1) != d)
    throw ArrayShapeError("weight_out must have shape (d_out, d_in)");
  if (!weight_out.writeable()) throw ArrayLayoutError("weight_out must be writeable");
  check_vector<float>(bias_out, "bias_out", p, true);
  auto* w_ptr = static_cast<float*>(weight_out.mutable_data());
  auto* b_ptr = static_cast<float*>(bias_out.mutable_data());
  py::gil_scoped_release release;
  dispatch(elem, [&](auto* tag) {
    erasus::squared_grad_sum(data_as(a, tag), data_as(g, tag), batch, steps, d, p, w_ptr, b_ptr);
  });
}

// The forget / retain importances of one layer: 1-D arrays of `elem` of one length. Returns that length.
int64_t check_importance_pair(const py::array& f, const py::array& r, Elem elem) {
  check_floats(f, "imp_forget", 1, "(n,)", elem);
  check_floats(r, "imp_retain", 1, "(n,)", elem);
  if (f.shape(0) != r.shape(0)) throw ArrayShapeError("imp_forget and imp_retain must have the same length");
  return f.shape(0);
}

void check_eps(double eps) {
  if (!(eps > 0.0) || !std::isfinite(eps) || static_cast<double>(static_cast<float>(eps)) != eps ||
      static_cast<float>(eps) == 0.f)
    throw ArrayShapeError("eps must be a positive finite float32 value, got " + std::to_string(eps));
}

int64_t dual_score_histogram(const py::array& f, const py::array& r, const std::string& elem_name, double eps,
                             int level, uint32_t prefix, py::array& hist) {
  const Elem elem = parse_elem(elem_name);
  const int64_t n = check_importance_pair(f, r, elem);
  check_eps(eps);
  if (level != 0 && level != 1) throw ArrayShapeError("level must be 0 (key >> 16) or 1 (key & 0xffff)");
  if (level == 0 && prefix != 0) throw ArrayShapeError("level 0 takes no prefix");
  if (level == 1 && prefix > 0x7fffu) throw ArrayShapeError("prefix must be a level-0 bin, below 32768");
  check_vector<int64_t>(hist, "hist", level == 0 ? 32768 : 65536, true);
  auto* hist_ptr = static_cast<int64_t*>(hist.mutable_data());
  py::gil_scoped_release release;
  return dispatch(elem, [&](auto* tag) {
    return erasus::dual_score_histogram(data_as(f, tag), data_as(r, tag), n, static_cast<float>(eps), level,
                                        prefix, hist_ptr);
  });
}

// The sampled blocks of one layer of n units: `starts` a 1-D int64 array, each block of `block` units inside
// [0, n). Returns the number of blocks.
int64_t check_block_starts(const py::array& starts, int64_t block, int64_t n) {
  const int64_t n_blocks = starts.ndim() == 1 ? starts.shape(0) : -1;
  if (n_blocks < 0) throw ArrayShapeError("starts must be 1-D");
  check_vector<int64_t>(starts, "starts", n_blocks, false);
  if (block < 1 || block > n) throw ArrayShapeError("block must lie in [1, n], got " + std::to_string(block));
  const auto* start_ptr = static_cast<const int64_t*>(starts.data());
  for (int64_t b = 0; b < n_blocks; ++b)
    if (start_ptr[b] < 0 || start_ptr[b] > n - block)
      throw ArrayShapeError("starts[" + std::to_string(b) + "] = " + std::to_string(start_ptr[b]) +
                            " puts its block outside [0, n)");
  return n_blocks;
}

// One layer of a call over several: its importances (checked as a pair) and their element type.
struct LayerPair {
  const void* f;
  const void* r;
  Elem elem;
  int64_t n;
};

// The layers of fs / rs / elems (one entry each per layer, numpy arrays and element-type names).
std::vector<LayerPair> check_layer_pairs(const py::list& fs, const py::list& rs, const py::list& elems) {
  const size_t layers = fs.size();
  if (rs.size() != layers || elems.size() != layers)
    throw ArrayShapeError("imp_forget, imp_retain and elems must have one entry per layer");
  std::vector<LayerPair> out(layers);
  for (size_t l = 0; l < layers; ++l) {
    for (const py::handle h : {fs[l], rs[l]})
      if (!py::isinstance<py::array>(h)) throw ArrayDTypeError("every layer's arrays must be numpy arrays");
    const auto f = py::reinterpret_borrow<py::array>(fs[l]);
    const auto r = py::reinterpret_borrow<py::array>(rs[l]);
    const Elem elem = parse_elem(elems[l].cast<std::string>());
    out[l] = LayerPair{f.data(), r.data(), elem, check_importance_pair(f, r, elem)};
  }
  return out;
}

void dual_sample_keys(const py::array& f, const py::array& r, const std::string& elem_name, double eps,
                      const py::array& starts, int64_t block, py::array& keys) {
  const Elem elem = parse_elem(elem_name);
  const int64_t n = check_importance_pair(f, r, elem);
  check_eps(eps);
  const int64_t n_blocks = check_block_starts(starts, block, n);
  check_vector<int32_t>(keys, "keys", n_blocks * block, true);
  const auto* start_ptr = static_cast<const int64_t*>(starts.data());
  auto* key_ptr = static_cast<int32_t*>(keys.mutable_data());
  py::gil_scoped_release release;
  dispatch(elem, [&](auto* tag) {
    erasus::dual_sample_keys(data_as(f, tag), data_as(r, tag), static_cast<float>(eps), start_ptr, n_blocks, block,
                             key_ptr);
    return 0;
  });
}

py::tuple dual_mask(const py::array& f, const py::array& r, const std::string& elem_name, double eps, uint32_t lo,
                    uint32_t hi, py::array& mask, py::array& cand_index, py::array& cand_key, bool vectorized) {
  const Elem elem = parse_elem(elem_name);
  const int64_t n = check_importance_pair(f, r, elem);
  check_eps(eps);
  check_vector<uint8_t>(mask, "mask", n, true);
  const int64_t cap = cand_index.ndim() == 1 ? cand_index.shape(0) : -1;
  if (cap < 0) throw ArrayShapeError("cand_index must be 1-D");
  check_vector<int64_t>(cand_index, "cand_index", cap, true);
  check_vector<int32_t>(cand_key, "cand_key", cap, true);
  auto* mask_ptr = static_cast<uint8_t*>(mask.mutable_data());
  auto* index_ptr = static_cast<int64_t*>(cand_index.mutable_data());
  auto* key_ptr = static_cast<int32_t*>(cand_key.mutable_data());
  int64_t above = 0, n_cand = 0, n_bad = 0;
  {
    py::gil_scoped_release release;
    above = dispatch(elem, [&](auto* tag) {
      return erasus::dual_mask(data_as(f, tag), data_as(r, tag), n, static_cast<float>(eps), lo, hi, mask_ptr,
                               index_ptr, key_ptr, cap, &n_cand, &n_bad, vectorized);
    });
  }
  // above == -1: more candidates (n_cand) than cand_index holds; none were written, the mask was. The caller
  // (a sampled bracket that missed) falls back to the histogram route.
  return py::make_tuple(above, n_cand, n_bad);
}

// The one-pass selection over every layer (see dual_sensitivity.h: dual_mask_collect, dual_choose_and_mark):
// masks[l] = key > hi for every layer, candidates in [lo, hi] listed (at most cap), and, when the k-th largest
// key of all layers lies in [lo, hi], the k largest marked. Returns (threshold key, count above hi, candidates
// listed, invalid elements); the key is -1 when the selection did not resolve: an invalid element, more than
// cap candidates, or the k-th largest key outside [lo, hi] (the masks are then not final).
py::tuple dual_select(const py::list& fs, const py::list& rs, const py::list& elems, double eps, uint32_t lo,
                      uint32_t hi, int64_t k, const py::list& masks, int64_t cap, bool vectorized) {
  check_eps(eps);
  const std::vector<LayerPair> layer = check_layer_pairs(fs, rs, elems);
  const size_t layers = layer.size();
  if (masks.size() != layers) throw ArrayShapeError("masks must have one entry per layer");
  if (k < 1) throw ArrayShapeError("k must be at least 1, got " + std::to_string(k));
  if (cap < 0) throw ArrayShapeError("cap must be >= 0, got " + std::to_string(cap));
  std::vector<uint8_t*> mask_ptr(layers);
  for (size_t l = 0; l < layers; ++l) {
    if (!py::isinstance<py::array>(masks[l])) throw ArrayDTypeError("every layer's arrays must be numpy arrays");
    auto mask = py::reinterpret_borrow<py::array>(masks[l]);
    check_vector<uint8_t>(mask, "mask", layer[l].n, true);
    mask_ptr[l] = static_cast<uint8_t*>(mask.mutable_data());
  }
  int64_t above = 0, bad = 0, key = -1, listed = 0;
  {
    py::gil_scoped_release release;
    static thread_local erasus::DualCandidates candidates;  // capacity kept between calls (no fresh pages)
    candidates.clear();
    bool missed = false;
    for (size_t l = 0; l < layers && !missed; ++l) {
      const LayerPair& L = layer[l];
      int64_t layer_bad = 0;
      const int64_t layer_above = dispatch(L.elem, [&](auto* tag) {
        using Ptr = decltype(tag);
        return erasus::dual_mask_collect(static_cast<Ptr>(L.f), static_cast<Ptr>(L.r), L.n,
                                         static_cast<float>(eps), lo, hi, mask_ptr[l], candidates, cap, &layer_bad,
                                         vectorized);
      });
      bad += layer_bad;
      missed = layer_above < 0;
      above += missed ? 0 : layer_above;
    }
    listed = candidates.count;
    if (!missed && bad == 0 && above < k && k <= above + listed)
      key = erasus::dual_choose_and_mark(candidates, k - above, mask_ptr.data());
  }
  return py::make_tuple(key, above, listed, bad);
}

// The keys of the sampled blocks of every layer (starts[l]: layer l's block starts, blocks[l] long), and the
// keys at the given 0-based ranks among them, largest first: the order statistics a sampled bracket needs,
// without the sample leaving C++.
py::list dual_sample_ranks(const py::list& fs, const py::list& rs, const py::list& elems, double eps,
                           const py::list& starts, const py::list& blocks, const py::array& ranks) {
  check_eps(eps);
  const std::vector<LayerPair> layer = check_layer_pairs(fs, rs, elems);
  const size_t layers = layer.size();
  if (starts.size() != layers || blocks.size() != layers)
    throw ArrayShapeError("starts and blocks must have one entry per layer");
  const int64_t n_ranks = ranks.ndim() == 1 ? ranks.shape(0) : -1;
  if (n_ranks < 0) throw ArrayShapeError("ranks must be 1-D");
  check_vector<int64_t>(ranks, "ranks", n_ranks, false);
  struct Sample {
    const int64_t* starts;
    int64_t n_blocks, block;
  };
  std::vector<Sample> sample(layers);
  int64_t total = 0;
  for (size_t l = 0; l < layers; ++l) {
    if (!py::isinstance<py::array>(starts[l])) throw ArrayDTypeError("every layer's arrays must be numpy arrays");
    const auto s = py::reinterpret_borrow<py::array>(starts[l]);
    const int64_t block = blocks[l].cast<int64_t>();
    const int64_t n_blocks = check_block_starts(s, block, layer[l].n);
    sample[l] = Sample{static_cast<const int64_t*>(s.data()), n_blocks, block};
    total += n_blocks * block;
  }
  const auto* rank_ptr = static_cast<const int64_t*>(ranks.data());
  for (int64_t q = 0; q < n_ranks; ++q)
    if (rank_ptr[q] < 0 || rank_ptr[q] >= total)
      throw ArrayShapeError("ranks must lie in [0, number of sampled keys)");
  std::vector<int32_t> out(static_cast<size_t>(n_ranks));
  {
    py::gil_scoped_release release;
    static thread_local std::vector<int32_t> keys;  // capacity kept between calls
    keys.resize(static_cast<size_t>(total));
    int64_t at = 0;
    for (size_t l = 0; l < layers; ++l) {
      const LayerPair& L = layer[l];
      const Sample& S = sample[l];
      dispatch(L.elem, [&](auto* tag) {
        using Ptr = decltype(tag);
        erasus::dual_sample_keys(static_cast<Ptr>(L.f), static_cast<Ptr>(L.r), static_cast<float>(eps), S.starts,
                                 S.n_blocks, S.block, keys.data() + at);
        return 0;
      });
      at += S.n_blocks * S.block;
    }
    erasus::dual_keys_at_ranks(keys.data(), total, rank_ptr, n_ranks, out.data());
  }
  py::list result;
  for (int32_t v : out) result.append(v);
  return result;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Erasus compiled CPU kernels (pybind11 + OpenMP). Use erasus.ops, not this module.";
  py::register_exception<ArrayDTypeError>(m, "ArrayDTypeError", PyExc_TypeError);
  py::register_exception<ArrayLayoutError>(m, "ArrayLayoutError", PyExc_ValueError);
  py::register_exception<ArrayShapeError>(m, "ArrayShapeError", PyExc_ValueError);
  m.def("kcenter_greedy", &kcenter_greedy, py::arg("x").noconvert(), py::arg("elem"), py::arg("init").noconvert(),
        py::arg("out").noconvert(), py::arg("min_dist").noconvert(), py::arg("scale") = 1.0,
        py::arg("prune") = true, py::arg("threads") = 0, py::arg("fixed_team") = false,
        py::arg("vectorized") = true,
        "Greedy k-center in place on x * scale; returns the squared covering radius of x * scale. prune: skip "
        "the rows the triangle inequality rules out (same selection). threads: at most this many (0: OpenMP's "
        "maximum; one for small steps); fixed_team: exactly `threads`. The selection is the same on any team. "
        "vectorized=False forces the portable distance loop (tests compare the two).");
  m.def("herding", &herding, py::arg("x").noconvert(), py::arg("elem"), py::arg("out").noconvert(),
        py::arg("selected").noconvert(), py::arg("scale") = 1.0, py::arg("threads") = 0,
        py::arg("fixed_team") = false, py::arg("vectorized") = true,
        "Herding selection on x * scale written into out; threads, fixed_team and vectorized as for kcenter_greedy.");
  m.def("row_distances", &row_distances, py::arg("x").noconvert(), py::arg("elem"), py::arg("centre").noconvert(),
        py::arg("out").noconvert(), py::arg("scale") = 1.0, py::arg("threads") = 0, py::arg("fixed_team") = false,
        py::arg("vectorized") = true,
        "Squared distance of every row of x * scale to the float32 vector centre, written into out (float32, n): "
        "the selection loops' distances bit for bit. threads, fixed_team and vectorized as for kcenter_greedy.");
  m.def("kcenter_step", &kcenter_step, py::arg("x").noconvert(), py::arg("elem"), py::arg("centre").noconvert(),
        py::arg("step"), py::arg("min_dist").noconvert(), py::arg("owner") = py::none(),
        py::arg("to_centre") = py::none(), py::arg("scale") = 1.0, py::arg("threads") = 0,
        py::arg("fixed_team") = false, py::arg("vectorized") = true,
        "One step of kcenter_greedy on x's rows, in place on min_dist (float32, n; -1 marks centres) and, with "
        "pruning, owner (int32, n; -1: none yet) given to_centre (float32: squared distances of the earlier "
        "centres to this one). centre: float32 (d,), already times scale. Returns (farthest row, its min_dist); "
        "(-1, -2.0) for no rows. Bit for bit kcenter_greedy's step.");
  m.def("herding_step", &herding_step, py::arg("x").noconvert(), py::arg("elem"), py::arg("target").noconvert(),
        py::arg("selected").noconvert(), py::arg("scale") = 1.0, py::arg("threads") = 0,
        py::arg("fixed_team") = false, py::arg("vectorized") = true,
        "One step of herding on x's rows: (the row with selected == 0 nearest target (float32, d), its squared "
        "distance); (-1, inf) when none is left. selected: uint8 (n,). Bit for bit herding's step.");
  m.def("row_nearest_mean", &row_nearest_mean, py::arg("x").noconvert(), py::arg("elem"), py::arg("scale") = 1.0,
        py::arg("threads") = 0, py::arg("fixed_team") = false, py::arg("vectorized") = true,
        "Index of the row of x * scale nearest the mean of the rows (summed in double, rows front to back, the "
        "same on any team), by k-center's distance; ties to the lowest index. threads, fixed_team and "
        "vectorized as for kcenter_greedy.");
  m.def("per_sample_grad_norms", &per_sample_grad_norms, py::arg("a").noconvert(), py::arg("g").noconvert(),
        py::arg("elem"), py::arg("path"), py::arg("weight_out").noconvert(), py::arg("bias_out").noconvert(),
        "Per-sample squared weight and bias gradient norms of a linear map, written into the outputs.");
  m.def("squared_grad_sum", &squared_grad_sum, py::arg("a").noconvert(), py::arg("g").noconvert(),
        py::arg("elem"), py::arg("weight_out").noconvert(), py::arg("bias_out").noconvert(),
        "Accumulate sum_i (G_i^T A_i)^2 and sum_i (sum_t g_it)^2 into the outputs.");
  m.def("dual_score_histogram", &dual_score_histogram, py::arg("imp_forget").noconvert(),
        py::arg("imp_retain").noconvert(), py::arg("elem"), py::arg("eps"), py::arg("level"), py::arg("prefix"),
        py::arg("hist").noconvert(),
        "Score S = f / (r + eps) and add its key bins to hist; returns the number of invalid elements.");
  m.def("dual_mask", &dual_mask, py::arg("imp_forget").noconvert(), py::arg("imp_retain").noconvert(),
        py::arg("elem"), py::arg("eps"), py::arg("lo"), py::arg("hi"), py::arg("mask").noconvert(),
        py::arg("cand_index").noconvert(), py::arg("cand_key").noconvert(), py::arg("vectorized") = true,
        "mask = key(S) > hi; keys in [lo, hi] listed as candidates. Returns (count above hi, candidates, invalid "
        "elements). vectorized=False forces the portable loop (tests compare the two).");
  m.def("dual_select", &dual_select, py::arg("imp_forget"), py::arg("imp_retain"), py::arg("elems"), py::arg("eps"),
        py::arg("lo"), py::arg("hi"), py::arg("k"), py::arg("masks"), py::arg("cap"), py::arg("vectorized") = true,
        "One-pass selection of the k largest keys over every layer with the bracket [lo, hi]: returns (threshold "
        "key or -1 when it did not resolve, count above hi, candidates listed, invalid elements).");
  m.def("dual_sample_ranks", &dual_sample_ranks, py::arg("imp_forget"), py::arg("imp_retain"), py::arg("elems"),
        py::arg("eps"), py::arg("starts"), py::arg("blocks"), py::arg("ranks").noconvert(),
        "The keys at the given ranks (0-based, largest first) among the keys of every layer's sampled blocks.");
  m.def("dual_sample_keys", &dual_sample_keys, py::arg("imp_forget").noconvert(), py::arg("imp_retain").noconvert(),
        py::arg("elem"), py::arg("eps"), py::arg("starts").noconvert(), py::arg("block"), py::arg("keys").noconvert(),
        "keys[b * block + j] = key(S) of element starts[b] + j: the scores of sampled runs.");
  m.def("dual_mask_vectorized_available", &erasus::dual_mask_vectorized_available,
        "Whether dual_mask's fused 256-bit loop runs on this CPU (x86-64 with AVX2 and F16C).");
  m.def("max_threads", &erasus::max_threads, "OpenMP threads the kernels use.");
  m.def("last_level_cache_bytes", &erasus::last_level_cache_bytes,
        "Bytes of the last-level cache the coreset loops assume: beyond it, 16-bit rows (and column sums) are\n"
        "prefetched with the non-temporal hint.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
