#include "inputs.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace dfa {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same_map(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.defined(), op, ": '", name, "' must be a tensor");
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": '", name, "' must have the shape of the feature maps ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": '", name,
                    "' must have the dtype of the feature maps (", ref.scalar_type(), "), got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": '", name,
                    "' must be on the device of the feature maps (", ref.device(), "), got ", t.device());
}

at::MemoryFormat layout_of(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;  // any other striding: copied to contiguous
}

at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format) {
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

}  // namespace

MapBatch prepare_maps(const char* op, at::TensorList features, const std::optional<at::Tensor>& student,
                      const std::optional<at::Tensor>& grad) {
  TORCH_CHECK_VALUE(!features.empty(), op, ": 'features' must hold at least one feature map, got an empty list");
  const at::Tensor& ref = features[0];
  TORCH_CHECK_VALUE(ref.defined(), op, ": 'features[0]' must be a tensor");
  TORCH_CHECK_VALUE(is_supported_float(ref.scalar_type()), op,
                    ": 'features' must be float16, bfloat16, float32 or float64, got ", ref.scalar_type());
  TORCH_CHECK_VALUE(ref.dim() >= 2, op, ": 'features' must have at least 2 dims [B, C, *rest], got shape ",
                    ref.sizes());
  for (size_t j = 1; j < features.size(); ++j) {
    const std::string name = "features[" + std::to_string(j) + "]";
    check_same_map(op, name.c_str(), features[j], ref);
  }
  if (student) check_same_map(op, "student", *student, ref);
  if (grad) check_same_map(op, "grad", *grad, ref);

  MapBatch batch;
  batch.format = layout_of(ref);
  batch.B = ref.size(0);
  batch.C = ref.size(1);
  batch.N = batch.B == 0 ? 0 : ref.numel() / batch.B;
  const int64_t spatial = batch.C == 0 ? 0 : batch.N / batch.C;
  batch.inner = batch.format == at::MemoryFormat::Contiguous ? std::max<int64_t>(spatial, 1) : 1;
  batch.features.reserve(features.size());
  for (const auto& f : features) batch.features.push_back(in_format(f, batch.format));
  if (student) batch.student = in_format(*student, batch.format);
  if (grad) batch.grad = in_format(*grad, batch.format);
  return batch;
}

void check_beta(const char* op, const at::Tensor& beta, int64_t K, const at::Tensor& like) {
  TORCH_CHECK_VALUE(beta.dim() == 1 && beta.size(0) == K, op,
                    ": 'beta' must be a 1-D tensor of length K=", K, " (one weight per feature map), got shape ",
                    beta.sizes());
  TORCH_CHECK_VALUE(is_supported_float(beta.scalar_type()), op, ": 'beta' must be a floating-point tensor, got ",
                    beta.scalar_type());
  TORCH_CHECK_VALUE(beta.device() == like.device(), op, ": 'beta' must be on the device of the feature maps (",
                    like.device(), "), got ", beta.device());
}

void check_margins(const char* op, const std::optional<at::Tensor>& margins, int64_t K, int64_t C,
                   const at::Tensor& like) {
  if (!margins) return;
  const at::Tensor& m = *margins;
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == K && m.size(1) == C, op,
                    ": 'margins' must have shape [K, C] = [", K, ", ", C, "] (one margin per feature map and channel), got ",
                    m.sizes());
  TORCH_CHECK_VALUE(is_supported_float(m.scalar_type()), op, ": 'margins' must be a floating-point tensor, got ",
                    m.scalar_type());
  TORCH_CHECK_VALUE(m.device() == like.device(), op, ": 'margins' must be on the device of the feature maps (",
                    like.device(), "), got ", m.device());
}

void check_per_sample(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef expected_shape,
                      const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == expected_shape, op, ": '", name, "' must have shape ", expected_shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), op, ": '", name, "' must be floating point, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": '", name, "' must be on the device of the feature maps (",
                    like.device(), "), got ", t.device());
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), op, ": 'eps' must be a positive finite number, got ", eps);
}

MapOutput::MapOutput(const at::Tensor& like, at::MemoryFormat format)
    : result(at::empty_like(like)), work(result.is_contiguous(format) ? result : at::empty_like(like, {}, format)) {}

at::Tensor MapOutput::finish() {
  if (!work.is_same(result)) result.copy_(work);
  return result;
}

at::ScalarType opmath_type(at::ScalarType map_type) {
  return map_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dfa
