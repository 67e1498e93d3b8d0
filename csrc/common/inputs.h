// Argument checking and memory-layout normalisation for the DFA ops, shared by every device's
// kernels.  Each check raises a ValueError that names the offending argument before any kernel
// runs; the Python fake implementations apply the same rules (dfa_ext/_checks.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

namespace dfa {

// The K teacher maps (and optional student / upstream-gradient maps) of one call, brought to one
// common memory layout so kernels can walk them as flat arrays.  Element n of sample b sits at
// offset b * N + n in every map, and its channel is (n / inner) % C.
struct MapBatch {
  std::vector<at::Tensor> features;
  at::Tensor student;  // undefined when the op has no student
  at::Tensor grad;     // undefined unless the op takes an upstream gradient of map shape
  int64_t B = 0;       // samples (size of dim 0)
  int64_t N = 0;       // elements per sample
  int64_t C = 0;       // channels (size of dim 1)
  int64_t inner = 1;   // elements between consecutive channels of a sample (1 for channels_last)
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

// Validates features (non-empty, same shape/dtype/device, floating point, >= 2 dims) and the
// optional student / grad maps against them, then returns them in a common layout: the layout of
// features[0] when it is contiguous or channels_last, else contiguous (others are copied only when
// their layout differs).
MapBatch prepare_maps(const char* op, at::TensorList features,
                      const std::optional<at::Tensor>& student = std::nullopt,
                      const std::optional<at::Tensor>& grad = std::nullopt);

// beta: floating 1-D tensor of length K on the features' device.
void check_beta(const char* op, const at::Tensor& beta, int64_t K, const at::Tensor& like);

// margins: floating [K, C] tensor on the features' device.
void check_margins(const char* op, const std::optional<at::Tensor>& margins, int64_t K, int64_t C,
                   const at::Tensor& like);

// A per-sample tensor (upstream loss gradient, saved statistics): shape [B, width...].
void check_per_sample(const char* op, const char* name, const at::Tensor& t,
                      c10::IntArrayRef expected_shape, const at::Tensor& like);

void check_eps(const char* op, double eps);

// Allocates an output shaped like `like` with the user-visible strides of at::empty_like (what the
// fake implementations promise), plus the buffer the kernel writes: the output itself when it is
// laid out in `format`, else a temporary in `format` that finish() copies back.
struct MapOutput {
  at::Tensor result;
  at::Tensor work;
  MapOutput(const at::Tensor& like, at::MemoryFormat format);
  at::Tensor finish();
};

// Kernel-side dtype for the reductions and weights: float for 16/32-bit maps, double for double.
at::ScalarType opmath_type(at::ScalarType map_type);

}  // namespace dfa
