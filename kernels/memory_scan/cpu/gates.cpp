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

// Writes one chunk's four outputs (this chunk's rows of the layouts above); len real tokens.
template <typename scalar_t>
void write_gates(const ChunkProducts<scalar_t>& chunk, int64_t len, scalar_t* retrieval_decays,
                 scalar_t* update_scores, scalar_t* state_decays, scalar_t* state_rows) {
  const int64_t n = chunk.n, last = len - 1;
  for (int64_t t = 0; t < n; ++t) {
    retrieval_decays[2 * t] = chunk.weight_decay[t];
    retrieval_decays[2 * t + 1] = chunk.momentum_carry[t];
    const scalar_t* product = chunk.decay_product.data() + t * n;
    scalar_t* scores = update_scores + t * n;
    for (int64_t i = 0; i <= t; ++i) scores[i] = product[i] * chunk.theta[i];
    for (int64_t i = t + 1; i < n; ++i) scores[i] = 0;
  }
  state_decays[0] = chunk.weight_decay[last];
  state_decays[1] = chunk.momentum_carry[last];
  state_decays[2] = chunk.momentum_decay[last];
  const scalar_t* last_scores = update_scores + last * n;
  const scalar_t* last_decay = chunk.decay_eta.data() + last * n;
  for (int64_t i = 0; i < n; ++i) {
    state_rows[2 * i] = last_scores[i];
    state_rows[2 * i + 1] = i <= last ? last_decay[i] * chunk.theta[i] : scalar_t(0);
  }
}

// A chunk's products and the adjoint rows its backward carries from token t + 1 to t (n each).
template <typename scalar_t>
struct ChunkAdjoints {
  ChunkProducts<scalar_t> products;
  std::vector<scalar_t> product, decay, theta;  // d/dC[t, i], d/dD_eta[t, i], d/dtheta_i

  explicit ChunkAdjoints(int64_t n) : products(n), product(n), decay(n), theta(n) {}
};

// Gradients of one chunk's real tokens (len of them) from those of its four outputs: the adjoints
// of `compute`'s recurrences, t = n-1 down to 0. `adjoints.products` holds the chunk's products.
template <typename scalar_t>
void chunk_backward(ChunkAdjoints<scalar_t>& adjoints, int64_t len,
                    const scalar_t* grad_retrieval_decays, const scalar_t* grad_update_scores,
                    const scalar_t* grad_state_decays, const scalar_t* grad_state_rows, scalar_t* grad_theta,
                    scalar_t* grad_eta, scalar_t* grad_alpha) {
  const ChunkProducts<scalar_t>& chunk = adjoints.products;
  const int64_t n = chunk.n, last = len - 1;
  std::fill(adjoints.product.begin(), adjoints.product.end(), scalar_t(0));
  std::fill(adjoints.decay.begin(), adjoints.decay.end(), scalar_t(0));
  std::fill(adjoints.theta.begin(), adjoints.theta.end(), scalar_t(0));
  scalar_t* grad_product = adjoints.product.data();
  scalar_t* grad_decay = adjoints.decay.data();
  scalar_t* grad_theta_row = adjoints.theta.data();
  // d/dA_t, d/dE_t, d/dP_t, each carried down from t + 1 through its recurrence.
  scalar_t grad_weight = 0, grad_carry = 0, grad_momentum = 0;
  for (int64_t t = n - 1; t >= 0; --t) {
    const bool at_last = t == last;
    grad_weight += grad_retrieval_decays[2 * t] + (at_last ? grad_state_decays[0] : scalar_t(0));
    grad_carry += grad_retrieval_decays[2 * t + 1] + (at_last ? grad_state_decays[1] : scalar_t(0));
    grad_momentum += grad_carry + (at_last ? grad_state_decays[2] : scalar_t(0));  // E_t = ... + P_t

    // Row t of the outputs: update_scores (and state_rows' first column) = C theta, state_rows' second = D_eta theta.
    const scalar_t* product = chunk.decay_product.data() + t * n;
    const scalar_t* decay = chunk.decay_eta.data() + t * n;
    const scalar_t* grad_scores = grad_update_scores + t * n;
    for (int64_t i = 0; i <= t; ++i) {
      const scalar_t grad = at_last ? grad_scores[i] + grad_state_rows[2 * i] : grad_scores[i];
      grad_theta_row[i] += grad * product[i];
      grad_product[i] += grad * chunk.theta[i];
    }
    if (at_last) {
      for (int64_t i = 0; i <= t; ++i) {
        grad_theta_row[i] += grad_state_rows[2 * i + 1] * decay[i];
        grad_decay[i] += grad_state_rows[2 * i + 1] * chunk.theta[i];
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

// Runs body(scratch, group, chunk, start, len) for every (group, chunk) pair, in parallel, each
// task with its own Scratch(chunk_size). A task gets enough chunks to be worth a thread (~GRAIN_SIZE values).
template <typename Scratch, typename Body>
void for_each_chunk(int64_t groups, int64_t seq_len, int64_t chunk_size, const Body& body) {
  const int64_t n_chunks = (seq_len + chunk_size - 1) / chunk_size;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (chunk_size * chunk_size));
  at::parallel_for(0, groups * n_chunks, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(chunk_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / n_chunks, chunk = item % n_chunks, start = chunk * chunk_size;
      body(scratch, group, chunk, start, std::min(chunk_size, seq_len - start));
    }
  });
}

void check_gates(const Tensor& theta, const Tensor& eta, const Tensor& alpha, int64_t chunk_size) {
  TORCH_CHECK(chunk_size >= 1, "memory_scan cpp gates: chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(theta.dim() == 2 && eta.sizes() == theta.sizes() && alpha.sizes() == theta.sizes(),
              "memory_scan cpp gates: theta, eta, alpha must all be (G, T)");
  TORCH_CHECK(eta.scalar_type() == theta.scalar_type() && alpha.scalar_type() == theta.scalar_type(),
              "memory_scan cpp gates: theta, eta, alpha must have one dtype");
}

// theta, eta, alpha (G, T) -> [retrieval_decays, update_scores, state_decays, state_rows].
std::vector<Tensor> gates_forward(const Tensor& theta_in, const Tensor& eta_in, const Tensor& alpha_in,
                                  int64_t chunk_size) {
  check_gates(theta_in, eta_in, alpha_in, chunk_size);
  const Tensor theta = theta_in.contiguous(), eta = eta_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t groups = theta.size(0), seq_len = theta.size(1), n = chunk_size;
  const int64_t n_chunks = (seq_len + n - 1) / n;
  const auto options = theta.options();
  Tensor retrieval_decays = at::empty({groups, n_chunks, n, 2}, options);
  Tensor update_scores = at::empty({groups, n_chunks, n, n}, options);
  Tensor state_decays = at::empty({groups, n_chunks, 3}, options);
  Tensor state_rows = at::empty({groups, n_chunks, n, 2}, options);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "memory_scan_gates_forward", [&] {
    const scalar_t* thetas = theta.const_data_ptr<scalar_t>();
    const scalar_t* etas = eta.const_data_ptr<scalar_t>();
    const scalar_t* alphas = alpha.const_data_ptr<scalar_t>();
    scalar_t* retrieval = retrieval_decays.mutable_data_ptr<scalar_t>();
    scalar_t* scores = update_scores.mutable_data_ptr<scalar_t>();
    scalar_t* state = state_decays.mutable_data_ptr<scalar_t>();
    scalar_t* rows = state_rows.mutable_data_ptr<scalar_t>();
    for_each_chunk<ChunkProducts<scalar_t>>(groups, seq_len, n, [&](ChunkProducts<scalar_t>& products, int64_t group,
                                                                    int64_t chunk, int64_t start, int64_t len) {
      const int64_t token = group * seq_len + start, index = group * n_chunks + chunk;
      products.compute(thetas + token, etas + token, alphas + token, len);
      write_gates(products, len, retrieval + index * n * 2, scores + index * n * n, state + index * 3,
                  rows + index * n * 2);
    });
  });
  return {retrieval_decays, update_scores, state_decays, state_rows};
}

// The gradients [theta, eta, alpha] (G, T) from those of gates_forward's four outputs.
std::vector<Tensor> gates_backward(const Tensor& theta_in, const Tensor& eta_in, const Tensor& alpha_in,
                                   const Tensor& grad_retrieval_decays_in, const Tensor& grad_update_scores_in,
                                   const Tensor& grad_state_decays_in, const Tensor& grad_state_rows_in,
                                   int64_t chunk_size) {
  check_gates(theta_in, eta_in, alpha_in, chunk_size);
  const Tensor theta = theta_in.contiguous(), eta = eta_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t groups = theta.size(0), seq_len = theta.size(1), n = chunk_size;
  const int64_t n_chunks = (seq_len + n - 1) / n;
  const auto dtype = theta.scalar_type();
  // Autograd may hand over broadcast or strided gradients (zeros for an unused output).
  const Tensor grad_retrieval_decays = grad_retrieval_decays_in.contiguous();
  const Tensor grad_update_scores = grad_update_scores_in.contiguous();
  const Tensor grad_state_decays = grad_state_decays_in.contiguous();
  const Tensor grad_state_rows = grad_state_rows_in.contiguous();
  TORCH_CHECK(grad_retrieval_decays.sizes() == at::IntArrayRef({groups, n_chunks, n, 2}) &&
                  grad_update_scores.sizes() == at::IntArrayRef({groups, n_chunks, n, n}) &&
                  grad_state_decays.sizes() == at::IntArrayRef({groups, n_chunks, 3}) &&
                  grad_state_rows.sizes() == at::IntArrayRef({groups, n_chunks, n, 2}),
              "memory_scan cpp gates: the gradients must have the shapes of gates_forward's outputs");
  Tensor grad_theta = at::empty_like(theta), grad_eta = at::empty_like(theta), grad_alpha = at::empty_like(theta);
  AT_DISPATCH_FLOATING_TYPES(dtype, "memory_scan_gates_backward", [&] {
    const scalar_t* thetas = theta.const_data_ptr<scalar_t>();
    const scalar_t* etas = eta.const_data_ptr<scalar_t>();
    const scalar_t* alphas = alpha.const_data_ptr<scalar_t>();
    const scalar_t* grad_retrieval = grad_retrieval_decays.const_data_ptr<scalar_t>();
    const scalar_t* grad_scores = grad_update_scores.const_data_ptr<scalar_t>();
    const scalar_t* grad_state = grad_state_decays.const_data_ptr<scalar_t>();
    const scalar_t* grad_rows = grad_state_rows.const_data_ptr<scalar_t>();
    scalar_t* grad_thetas = grad_theta.mutable_data_ptr<scalar_t>();
    scalar_t* grad_etas = grad_eta.mutable_data_ptr<scalar_t>();
    scalar_t* grad_alphas = grad_alpha.mutable_data_ptr<scalar_t>();
    for_each_chunk<ChunkAdjoints<scalar_t>>(groups, seq_len, n, [&](ChunkAdjoints<scalar_t>& adjoints, int64_t group,
                                                                    int64_t chunk, int64_t start, int64_t len) {
      const int64_t token = group * seq_len + start, index = group * n_chunks + chunk;
      adjoints.products.compute(thetas + token, etas + token, alphas + token, len);
      chunk_backward(adjoints, len, grad_retrieval + index * n * 2, grad_scores + index * n * n,
                     grad_state + index * 3, grad_rows + index * n * 2, grad_thetas + token, grad_etas + token,
                     grad_alphas + token);
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
