// Autograd formulas of the differentiable DFA ops (method.md section 4), registered for the
// Autograd dispatch key of every device.  Each backward is itself a dfa:: op (*_backward), so it
// runs fused, and gradients are computed only for the inputs that need them.
//
// Why C++: the Python registration (torch.library.register_autograd) flattens the Tensor[] argument
// through pytree on every call, which cost ~0.3 ms per forward+backward on the development CPU,
// ten times the fused kernels' own time on small maps.  The once-differentiable guard of the
// backward ops stays in Python (dfa_ext/_autograd.py): it only runs under create_graph=True.
//
// needs_input_grad counts the defined tensor inputs in order (a Tensor[] gives one per map; an
// absent margins tensor none); backward returns one gradient per argument slot: one per map, one
// per other tensor argument (present or not) and one per non-tensor argument.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace dfa {
namespace {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Calls a backward op below autograd (no graph to record) unless the caller asked for a
// differentiable backward (create_graph=True): then through autograd, whose formula for the
// backward op raises the "first-order only" error when it is differentiated.
template <typename Signature, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Signature>& handle, Args&&... args) {
  if (at::GradMode::is_enabled()) return handle.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return handle.call(std::forward<Args>(args)...);
}

// The saved inputs: K feature maps, then the extra tensors in order.
std::vector<Tensor> saved_features(const variable_list& saved, int64_t K) {
  return {saved.begin(), saved.begin() + K};
}

// Whether any of the K maps, inputs first .. first + K - 1, requires grad.
bool any_feature_needs_grad(AutogradContext* ctx, int64_t first, int64_t K) {
  for (int64_t j = 0; j < K; ++j)
    if (ctx->needs_input_grad(first + j)) return true;
  return false;
}

// The maps' gradients (undefined where a map does not require grad), appended to out.
void append_feature_grads(AutogradContext* ctx, const std::vector<Tensor>& grads, int64_t first, int64_t K,
                          variable_list& out) {
  for (int64_t j = 0; j < K; ++j) out.push_back(ctx->needs_input_grad(first + j) && !grads.empty() ? grads[j] : Tensor());
}

// The saved margins (an undefined tensor when none were passed) as the ops take them.
std::optional<Tensor> saved_margins(const Tensor& saved) {
  return saved.defined() ? std::optional<Tensor>(saved) : std::nullopt;
}

// margins, input `index` when present, are OFD constants from the teacher's BN.
void check_no_margin_grad(AutogradContext* ctx, const std::optional<Tensor>& margins, const char* name, int64_t index) {
  TORCH_CHECK(!margins || !ctx->needs_input_grad(index), "dfa::", name,
              ": 'margins' are constants and get no gradient; pass margins.detach()");
}

Tensor or_undefined(const Tensor& t, bool need) { return need ? t : Tensor(); }

// aggregate(features, beta, margins) -> A -------------------------------------------------------

class Aggregate : public torch::autograd::Function<Aggregate> {
 public:
  static Tensor forward(AutogradContext* ctx, TensorList features, const Tensor& beta,
                        const std::optional<Tensor>& margins) {
    static const auto forward_op = op<Tensor(TensorList, const Tensor&, const std::optional<Tensor>&)>("dfa::aggregate");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = forward_op.call(features, beta, margins);
    std::vector<Tensor> saved(features.begin(), features.end());
    saved.push_back(beta);
    saved.push_back(margins.value_or(Tensor()));
    ctx->save_for_backward(saved);
    ctx->saved_data["K"] = static_cast<int64_t>(features.size());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op<std::tuple<Tensor, std::vector<Tensor>>(const Tensor&, TensorList, const Tensor&,
                                                   const std::optional<Tensor>&, std::array<bool, 2>)>(
            "dfa::aggregate_backward");
    const int64_t K = ctx->saved_data["K"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& beta = saved[K];
    const std::optional<Tensor> margins = saved_margins(saved[K + 1]);
    // Inputs: features (0 .. K - 1), beta (K), margins (K + 1).
    check_no_margin_grad(ctx, margins, "aggregate", K + 1);
    const bool need_beta = ctx->needs_input_grad(K), need_features = any_feature_needs_grad(ctx, 0, K);
    auto [grad_beta, grad_features] =
        call_backward(backward_op, grads[0], saved_features(saved, K), beta, margins, std::array<bool, 2>{need_beta, need_features});
    variable_list out;
    append_feature_grads(ctx, grad_features, 0, K, out);
    out.push_back(or_undefined(grad_beta, need_beta));
    out.push_back(Tensor());  // margins
    return out;
  }
};

Tensor aggregate_autograd(TensorList features, const Tensor& beta, const std::optional<Tensor>& margins) {
  return Aggregate::apply(features, beta, margins);
}

// bridge_st_loss_forward(student, features, beta, eps) -> (loss, stats) ---------------------------

class BridgeForward : public torch::autograd::Function<BridgeForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& student, TensorList features, const Tensor& beta,
                               double eps) {
    static const auto forward_op =
        op<std::tuple<Tensor, Tensor>(const Tensor&, TensorList, const Tensor&, double)>("dfa::bridge_st_loss_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] = forward_op.call(student, features, beta, eps);
    std::vector<Tensor> saved(features.begin(), features.end());
    saved.insert(saved.end(), {student, beta, stats});
    ctx->save_for_backward(saved);
    ctx->saved_data["K"] = static_cast<int64_t>(features.size());
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({stats});
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op<std::tuple<Tensor, Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, TensorList, const Tensor&,
                                                           const Tensor&, double, std::array<bool, 3>)>(
            "dfa::bridge_st_loss_backward");
    const int64_t K = ctx->saved_data["K"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &student = saved[K], &beta = saved[K + 1], &stats = saved[K + 2];
    // Inputs: student (0), features (1 .. K), beta (K + 1).
    const bool need_student = ctx->needs_input_grad(0), need_beta = ctx->needs_input_grad(K + 1);
    const bool need_features = any_feature_needs_grad(ctx, 1, K);
    auto [grad_student, grad_beta, grad_features] =
        call_backward(backward_op, grads[0], student, saved_features(saved, K), beta, stats,
                      ctx->saved_data["eps"].toDouble(), std::array<bool, 3>{need_student, need_beta, need_features});
    variable_list out{or_undefined(grad_student, need_student)};
    append_feature_grads(ctx, grad_features, 1, K, out);
    out.push_back(or_undefined(grad_beta, need_beta));
    out.push_back(Tensor());  // eps
    return out;
  }
};

std::tuple<Tensor, Tensor> bridge_forward_autograd(const Tensor& student, TensorList features, const Tensor& beta,
                                                   double eps) {
  const variable_list out = BridgeForward::apply(student, features, beta, eps);
  return {out[0], out[1]};
}

// partial_l2(student, features, beta, margins) -> loss -------------------------------------------

class PartialL2 : public torch::autograd::Function<PartialL2> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& student, TensorList features, const Tensor& beta,
                        const std::optional<Tensor>& margins) {
    static const auto forward_op =
        op<Tensor(const Tensor&, TensorList, const Tensor&, const std::optional<Tensor>&)>("dfa::partial_l2");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor loss = forward_op.call(student, features, beta, margins);
    std::vector<Tensor> saved(features.begin(), features.end());
    saved.insert(saved.end(), {student, beta, margins.value_or(Tensor())});
    ctx->save_for_backward(saved);
    ctx->saved_data["K"] = static_cast<int64_t>(features.size());
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op<std::tuple<Tensor, Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, TensorList, const Tensor&,
                                                           const std::optional<Tensor>&, std::array<bool, 3>)>(
            "dfa::partial_l2_backward");
    const int64_t K = ctx->saved_data["K"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &student = saved[K], &beta = saved[K + 1];
    const std::optional<Tensor> margins = saved_margins(saved[K + 2]);
    // Inputs: student (0), features (1 .. K), beta (K + 1), margins (K + 2).
    check_no_margin_grad(ctx, margins, "partial_l2", K + 2);
    const bool need_student = ctx->needs_input_grad(0), need_beta = ctx->needs_input_grad(K + 1);
    const bool need_features = any_feature_needs_grad(ctx, 1, K);
    auto [grad_student, grad_beta, grad_features] =
        call_backward(backward_op, grads[0], student, saved_features(saved, K), beta, margins,
                      std::array<bool, 3>{need_student, need_beta, need_features});
    variable_list out{or_undefined(grad_student, need_student)};
    append_feature_grads(ctx, grad_features, 1, K, out);
    out.push_back(or_undefined(grad_beta, need_beta));
    out.push_back(Tensor());  // margins
    return out;
  }
};

Tensor partial_l2_autograd(const Tensor& student, TensorList features, const Tensor& beta,
                           const std::optional<Tensor>& margins) {
  return PartialL2::apply(student, features, beta, margins);
}

}  // namespace

TORCH_LIBRARY_IMPL(dfa, Autograd, m) {
  m.impl("aggregate", &aggregate_autograd);
  m.impl("bridge_st_loss_forward", &bridge_forward_autograd);
  m.impl("partial_l2", &partial_l2_autograd);
}

}  // namespace dfa
