// fused.stacked_gates as one op: the gate products of every chunk from theta, eta, alpha, and the
// hand-written backward, parallel over (group, chunk) pairs (README.md here, "The gate products in C++").
//
// Layouts (G groups, T tokens, nc chunks of n = chunk_size tokens; the last chunk is padded to n
// with inert gates, theta 0, eta 1, alpha 0, as decays.chunk_decays pads it):
//   theta, eta, alpha and their gradients: (G, T)
//   retrieval_decays (G, nc, n, 2): [A_t, E_t]
//   update_scores    (G, nc, n, n): C[t, i] theta_i, zero above the diagonal
//   state_decays     (G, nc, 3):    [A_l, E_l, P_l]
//   state_rows       (G, nc, n, 2): [C[l, i] theta_i, D_eta[l, i] theta_i]
// with l the chunk's last real token (n - 1 but in a short last chunk).
//
// Every chunk restarts its products, so it is computed row by row, t = 0..n-1, a_t = 1 - alpha_t:
//   A_t = a_t A_{t-1}      P_t = eta_t P_{t-1}      E_t = a_t E_{t-1} + P_t      (A, P = 1, E = 0 before t = 0)
//   D_eta[t, i] = eta_t D_eta[t-1, i]      C[t, i] = a_t C[t-1, i] + D_eta[t, i]      (i < t; both 1 at i = t)
// These are decays.py's E = D_alpha P and C = D_alpha D_eta unrolled (D_alpha[t, j] = a_t D_alpha[t-1, j]),
// the way W_t = a_t W_{t-1} + S_t unrolls: O(n^2) per chunk where the products are O(n^3), and only
// products and sums, no ratios of prefix products and no logs, so a gate at exactly 0 or 1 gives
// exact zeros and exact, finite derivatives. A, P and D_eta are decays.segment_product's cumulative
// products, multiplied in the same order. The backward recomputes a chunk's products (only the gates
// are saved) and runs the adjoints of the same recurrences from t = n-1 down to 0.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

using at::Tensor;

// One chunk of one group: its gates padded to n tokens, and their products (a worker's scratch,
// reused for every chunk it computes).
template <typename scalar_t>
struct ChunkProducts {
  using value_type = scalar_t;
  int64_t n;
  std::vector<scalar_t> theta, eta, keep;                              // (n): theta_t, eta_t, a_t
  std::vector<scalar_t> weight_decay, momentum_decay, momentum_carry;  // (n): A_t, P_t, E_t
  std::vector<scalar_t> decay_eta, decay_product;                      // (n, n), lower triangle: D_eta, C

  explicit ChunkProducts(int64_t n)
      : n(n), theta(n), eta(n), keep(n), weight_decay(n), momentum_decay(n), momentum_carry(n),
        decay_eta(n * n), decay_product(n * n) {}

  // The products of the chunk whose first `len` gates start at theta, eta, alpha (tokens len..n-1 are padding).
  void compute(const scalar_t* theta_in, const scalar_t* eta_in, const scalar_t* alpha_in, int64_t len) {
    for (int64_t t = 0; t < n; ++t) {
      const bool real = t < len;
      theta[t] = real ? theta_in[t] : scalar_t(0);
      eta[t] = real ? eta_in[t] : scalar_t(1);
      keep[t] = real ? scalar_t(1) - alpha_in[t] : scalar_t(1);
    }
    scalar_t weight = 1, momentum = 1, carry = 0;
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t keep_t = keep[t], eta_t = eta[t];
      weight *= keep_t;
      momentum *= eta_t;
      carry = keep_t * carry + momentum;
      weight_decay[t] = weight;
      momentum_decay[t] = momentum;
      momentum_carry[t] = carry;
      scalar_t* decay = decay_eta.data() + t * n;
      scalar_t* product = decay_product.data() + t * n;
      if (t > 0) {
        const scalar_t* decay_prev = decay - n;
        const scalar_t* product_prev = product - n;
        for (int64_t i = 0; i < t; ++i) {
          decay[i] = decay_prev[i] * eta_t;
          product[i] = keep_t * product_prev[i] + decay[i];
        }
      }
      decay[t] = 1;
      product[t] = 1;
    }
  }
};

// The four gate tensors of the layouts above (the outputs, or their gradients) from one chunk on.
template <typename pointer>
struct GatePointers {
  pointer retrieval_decays, update_scores, state_decays, state_rows;

  // At chunk `index` (group * nc + chunk) of n tokens.
  GatePointers at(int64_t index, int64_t n) const {
    return {retrieval_decays + index * n * 2, update_scores + index * n * n, state_decays + index * 3,
            state_rows + index * n * 2};
  }
};

// Writes one chunk's four outputs; len real tokens.
template <typename scalar_t>
void write_gates(const ChunkProducts<scalar_t>& chunk, int64_t len, const GatePointers<scalar_t*>& out) {
  const int64_t n = chunk.n, last = len - 1;
  for (int64_t t = 0; t < n; ++t) {
    out.retrieval_decays[2 * t] = chunk.weight_decay[t];
    out.retrieval_decays[2 * t + 1] = chunk.momentum_carry[t];
    const scalar_t* product = chunk.decay_product.data() + t * n;
    scalar_t* scores = out.update_scores + t * n;
    for (int64_t i = 0; i <= t; ++i) scores[i] = product[i] * chunk.theta[i];
    for (int64_t i = t + 1; i < n; ++i) scores[i] = 0;
  }
  out.state_decays[0] = chunk.weight_decay[last];
  out.state_decays[1] = chunk.momentum_carry[last];
  out.state_decays[2] = chunk.momentum_decay[last];
  const scalar_t* last_scores = out.update_scores + last * n;
  const scalar_t* last_decay = chunk.decay_eta.data() + last * n;
  for (int64_t i = 0; i < n; ++i) {
    out.state_rows[2 * i] = last_scores[i];
    out.state_rows[2 * i + 1] = i <= last ? last_decay[i] * chunk.theta[i] : scalar_t(0);
  }
}

// A chunk's products and the adjoint rows its backward carries from token t + 1 to t (n each).
template <typename scalar_t>
struct ChunkAdjoints : ChunkProducts<scalar_t> {
  std::vector<scalar_t> grad_product, grad_decay, grad_theta;  // d/dC[t, i], d/dD_eta[t, i], d/dtheta_i

  explicit ChunkAdjoints(int64_t n) : ChunkProducts<scalar_t>(n), grad_product(n), grad_decay(n), grad_theta(n) {}
};

// Gradients of one chunk's len real tokens (written from grad_theta, grad_eta, grad_alpha on) from
// those of its four outputs: the adjoints of `compute`'s recurrences, t = n-1 down to 0, on the
// chunk's products in `adjoints`.
template <typename scalar_t>
void chunk_backward(ChunkAdjoints<scalar_t>& adjoints, int64_t len, const GatePointers<const scalar_t*>& grads,
                    scalar_t* grad_theta, scalar_t* grad_eta, scalar_t* grad_alpha) {
  const ChunkProducts<scalar_t>& chunk = adjoints;
  const int64_t n = chunk.n, last = len - 1;
  std::fill(adjoints.grad_product.begin(), adjoints.grad_product.end(), scalar_t(0));
  std::fill(adjoints.grad_decay.begin(), adjoints.grad_decay.end(), scalar_t(0));
  std::fill(adjoints.grad_theta.begin(), adjoints.grad_theta.end(), scalar_t(0));
  scalar_t* grad_product = adjoints.grad_product.data();
  scalar_t* grad_decay = adjoints.grad_decay.data();
  scalar_t* grad_theta_row = adjoints.grad_theta.data();
  // d/dA_t, d/dE_t, d/dP_t, each carried down from t + 1 through its recurrence.
  scalar_t grad_weight = 0, grad_carry = 0, grad_momentum = 0;
  for (int64_t t = n - 1; t >= 0; --t) {
    const bool at_last = t == last;
    grad_weight += grads.retrieval_decays[2 * t] + (at_last ? grads.state_decays[0] : scalar_t(0));
    grad_carry += grads.retrieval_decays[2 * t + 1] + (at_last ? grads.state_decays[1] : scalar_t(0));
    grad_momentum += grad_carry + (at_last ? grads.state_decays[2] : scalar_t(0));  // E_t = ... + P_t

    // Row t of the outputs: update_scores (and state_rows' first column) = C theta, state_rows' second = D_eta theta.
    const scalar_t* product = chunk.decay_product.data() + t * n;
    const scalar_t* decay = chunk.decay_eta.data() + t * n;
    const scalar_t* grad_scores = grads.update_scores + t * n;
    for (int64_t i = 0; i <= t; ++i) {
      const scalar_t grad = at_last ? grad_scores[i] + grads.state_rows[2 * i] : grad_scores[i];
      grad_theta_row[i] += grad * product[i];
      grad_product[i] += grad * chunk.theta[i];
    }
    if (at_last) {
      for (int64_t i = 0; i <= t; ++i) {
        grad_theta_row[i] += grads.state_rows[2 * i + 1] * decay[i];
        grad_decay[i] += grads.state_rows[2 * i + 1] * chunk.theta[i];
      }
    }

    // Row t from row t - 1 and the gates a_t, eta_t (the diagonal entries are constants).
    scalar_t grad_keep = 0, grad_eta_t = 0;
    if (t > 0) {
      const scalar_t* product_prev = product - n;
      const scalar_t* decay_prev = decay - n;
      const scalar_t keep = chunk.keep[t], eta = chunk.eta[t];
      for (int64_t i = 0; i < t; ++i) {  // C[t, i] = a_t C[t-1, i] + D_eta[t, i], D_eta[t, i] = eta_t D_eta[t-1, i]
        grad_decay[i] += grad_product[i];
        grad_keep += grad_product[i] * product_prev[i];
        grad_eta_t += grad_decay[i] * decay_prev[i];
        grad_product[i] *= keep;
        grad_decay[i] *= eta;
      }
      grad_keep += grad_weight * chunk.weight_decay[t - 1] + grad_carry * chunk.momentum_carry[t - 1];
      grad_eta_t += grad_momentum * chunk.momentum_decay[t - 1];
    } else {  // A_{-1} = P_{-1} = 1, E_{-1} = 0
      grad_keep += grad_weight;
      grad_eta_t += grad_momentum;
    }
    grad_weight *= chunk.keep[t];
    grad_carry *= chunk.keep[t];
    grad_momentum *= chunk.eta[t];
    if (t < len) {  // theta_t's last use was row t
      grad_theta[t] = grad_theta_row[t];
      grad_eta[t] = grad_eta_t;
      grad_alpha[t] = -grad_keep;  // a_t = 1 - alpha_t
    }
  }
}

void check_gates(const Tensor& theta, const Tensor& eta, const Tensor& alpha, int64_t chunk_size) {
  TORCH_CHECK(chunk_size >= 1, "memory_scan cpp gates: chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(theta.dim() == 2 && eta.sizes() == theta.sizes() && alpha.sizes() == theta.sizes(),
              "memory_scan cpp gates: theta, eta, alpha must all be (G, T)");
  TORCH_CHECK(eta.scalar_type() == theta.scalar_type() && alpha.scalar_type() == theta.scalar_type(),
              "memory_scan cpp gates: theta, eta, alpha must have one dtype");
}

// For every (group, chunk) pair, in parallel: computes the chunk's products into the task's
// Scratch(chunk_size) (a ChunkProducts) and runs body(scratch, token, index, len): the chunk's first
// token in (G, T), its index in (G, nc), its real length. A task takes enough chunks to be worth a
// thread (~GRAIN_SIZE values).
template <typename Scratch, typename Body>
void for_each_chunk(const Tensor& theta, const Tensor& eta, const Tensor& alpha, int64_t chunk_size, const Body& body) {
  using scalar_t = typename Scratch::value_type;
  const int64_t groups = theta.size(0), seq_len = theta.size(1);
  const int64_t n_chunks = (seq_len + chunk_size - 1) / chunk_size;
  const scalar_t* thetas = theta.const_data_ptr<scalar_t>();
  const scalar_t* etas = eta.const_data_ptr<scalar_t>();
  const scalar_t* alphas = alpha.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (chunk_size * chunk_size));
  at::parallel_for(0, groups * n_chunks, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(chunk_size);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t start = (index % n_chunks) * chunk_size, token = (index / n_chunks) * seq_len + start;
      const int64_t len = std::min(chunk_size, seq_len - start);
      scratch.compute(thetas + token, etas + token, alphas + token, len);
      body(scratch, token, index, len);
    }
  });
}

// theta, eta, alpha (G, T) -> [retrieval_decays, update_scores, state_decays, state_rows].
std::vector<Tensor> gates_forward(const Tensor& theta_in, const Tensor& eta_in, const Tensor& alpha_in,
                                  int64_t chunk_size) {
  check_gates(theta_in, eta_in, alpha_in, chunk_size);
  const Tensor theta = theta_in.contiguous(), eta = eta_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t groups = theta.size(0), n = chunk_size, n_chunks = (theta.size(1) + n - 1) / n;
  const auto options = theta.options();
  std::vector<Tensor> gates{at::empty({groups, n_chunks, n, 2}, options), at::empty({groups, n_chunks, n, n}, options),
                            at::empty({groups, n_chunks, 3}, options), at::empty({groups, n_chunks, n, 2}, options)};
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "memory_scan_gates_forward", [&] {
    const GatePointers<scalar_t*> out{gates[0].mutable_data_ptr<scalar_t>(), gates[1].mutable_data_ptr<scalar_t>(),
                                      gates[2].mutable_data_ptr<scalar_t>(), gates[3].mutable_data_ptr<scalar_t>()};
    for_each_chunk<ChunkProducts<scalar_t>>(
        theta, eta, alpha, n, [&](const ChunkProducts<scalar_t>& products, int64_t, int64_t index, int64_t len) {
          write_gates(products, len, out.at(index, n));
        });
  });
  return gates;
}

// The gradients [theta, eta, alpha] (G, T) from those of gates_forward's four outputs.
std::vector<Tensor> gates_backward(const Tensor& theta_in, const Tensor& eta_in, const Tensor& alpha_in,
                                   const Tensor& grad_retrieval_decays, const Tensor& grad_update_scores,
                                   const Tensor& grad_state_decays, const Tensor& grad_state_rows,
                                   int64_t chunk_size) {
  check_gates(theta_in, eta_in, alpha_in, chunk_size);
  const Tensor theta = theta_in.contiguous(), eta = eta_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t groups = theta.size(0), n = chunk_size, n_chunks = (theta.size(1) + n - 1) / n;
  // Autograd may hand over broadcast or strided gradients (zeros for an unused output).
  const std::vector<Tensor> grads{grad_retrieval_decays.contiguous(), grad_update_scores.contiguous(),
                                  grad_state_decays.contiguous(), grad_state_rows.contiguous()};
  const std::vector<std::vector<int64_t>> shapes{
      {groups, n_chunks, n, 2}, {groups, n_chunks, n, n}, {groups, n_chunks, 3}, {groups, n_chunks, n, 2}};
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == at::IntArrayRef(shapes[i]),
                "memory_scan cpp gates: the gradients must have the shapes of gates_forward's outputs");
  }
  Tensor grad_theta = at::empty_like(theta), grad_eta = at::empty_like(theta), grad_alpha = at::empty_like(theta);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "memory_scan_gates_backward", [&] {
    const GatePointers<const scalar_t*> grad{grads[0].const_data_ptr<scalar_t>(), grads[1].const_data_ptr<scalar_t>(),
                                             grads[2].const_data_ptr<scalar_t>(), grads[3].const_data_ptr<scalar_t>()};
    scalar_t* grad_thetas = grad_theta.mutable_data_ptr<scalar_t>();
    scalar_t* grad_etas = grad_eta.mutable_data_ptr<scalar_t>();
    scalar_t* grad_alphas = grad_alpha.mutable_data_ptr<scalar_t>();
    for_each_chunk<ChunkAdjoints<scalar_t>>(
        theta, eta, alpha, n, [&](ChunkAdjoints<scalar_t>& adjoints, int64_t token, int64_t index, int64_t len) {
          chunk_backward(adjoints, len, grad.at(index, n), grad_thetas + token, grad_etas + token, grad_alphas + token);
        });
  });
  return {grad_theta, grad_eta, grad_alpha};
}

}  // namespace

// Called by memory_scan.cpp's PYBIND11_MODULE: the extension stays one module.
void define_gate_ops(pybind11::module_& module) {
  module.def("gates_forward", &gates_forward,
             "fused.stacked_gates: theta, eta, alpha (G, T) -> the gate products of every chunk (G, nc, ...)");
  module.def("gates_backward", &gates_backward,
             "the gradients of theta, eta, alpha from those of gates_forward's four outputs");
}
