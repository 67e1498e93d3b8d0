// The one place where the DFA op schemas are defined (namespace `dfa`, so torch.ops.dfa.<name>).
// Device kernels register themselves in cpu/ and cuda/, the autograd formulas in autograd.cpp; fake
// (meta) kernels and the backward ops' once-differentiable guard are registered from Python
// (dfa_ext/_fake.py, dfa_ext/_autograd.py).
#ifndef DFA_NO_PYTHON_MODULE  // defined by the CMake build (CMakeLists.txt), which has no Python module
#include <Python.h>
#endif
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace dfa {
namespace {

// bridge_st_loss returns only the per-sample loss; its forward op also returns the per-sample dot
// products the backward needs, so the backward never re-reduces the maps.
at::Tensor bridge_st_loss(const at::Tensor& student, at::TensorList features, const at::Tensor& beta, double eps) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("dfa::bridge_st_loss_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                                      const at::Tensor&, double)>();
  return std::get<0>(forward.call(student, features, beta, eps));
}

}  // namespace

TORCH_LIBRARY(dfa, m) {
  // A = sum_j softmax(beta)_j * max(T_j, margins[j]) per channel (identity without margins).
  m.def("aggregate(Tensor[] features, Tensor beta, Tensor? margins=None) -> Tensor");
  // output_mask = (grad_beta, grad_features); a masked-out output is empty.
  m.def("aggregate_backward(Tensor grad, Tensor[] features, Tensor beta, Tensor? margins, bool[2] output_mask)"
        " -> (Tensor grad_beta, Tensor[] grad_features)");

  // Per-sample |s/|s| - A/|A||^2 with A = sum_j softmax(beta)_j T_j (norms clamped below by eps).
  m.def("bridge_st_loss(Tensor student, Tensor[] features, Tensor beta, float eps=1e-12) -> Tensor",
        &bridge_st_loss);
  // stats[b] = (<s,s>, <s,T_1..K>, <A,T_1..K>), shape [B, 2K + 1].
  m.def("bridge_st_loss_forward(Tensor student, Tensor[] features, Tensor beta, float eps) -> (Tensor loss, Tensor stats)");
  // output_mask = (grad_student, grad_beta, grad_features).
  m.def("bridge_st_loss_backward(Tensor grad, Tensor student, Tensor[] features, Tensor beta, Tensor stats, "
        "float eps, bool[3] output_mask) -> (Tensor grad_student, Tensor grad_beta, Tensor[] grad_features)");

  // Per-sample OFD partial L2 between the student and the margin-transformed aggregation.
  m.def("partial_l2(Tensor student, Tensor[] features, Tensor beta, Tensor? margins=None) -> Tensor");
  m.def("partial_l2_backward(Tensor grad, Tensor student, Tensor[] features, Tensor beta, Tensor? margins, "
        "bool[3] output_mask) -> (Tensor grad_student, Tensor grad_beta, Tensor[] grad_features)");

}

}  // namespace dfa

#ifndef DFA_NO_PYTHON_MODULE
// `import dfa_ext._C` loads this library so the registrations above run; it exposes no Python API
// of its own (ops are reached through torch.ops.dfa).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dfa_ext native kernels (see torch.ops.dfa)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
#endif  // DFA_NO_PYTHON_MODULE
