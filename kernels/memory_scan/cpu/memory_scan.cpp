// memory_scan's chunk loop in C++ (ATen), parallel over the G = B * H (batch, head) groups.
//
// The same math, saved intermediates and state layout as fused.py (README.md here): each worker
// of at::parallel_for runs the whole chunk loop, forward or backward, for a contiguous slice of
// groups, so no Python or autograd dispatch runs between the per-chunk ops and the groups of two
// workers never meet. ATen ops called inside the parallel region run single-threaded.
//
// Layouts (G groups, T tokens, nc chunks of n tokens, the last one possibly shorter):
//   q, k, v, y and their gradients: (G, T, d)
//   gates: retrieval_decays (G, nc, n, 2), update_scores (G, nc, n, n), state_decays (G, nc, 3),
//          state_rows (G, nc, n, 2)
//   weights, momentum: L x (G, d_out, d_in) each, in and out (the caller's layout; the loop keeps
//          each layer's state as one [W | S] (G, d_out, 2, d_in), copied in and out here, inside the
//          parallel region, where a stack in Python cost two ATen copies and two autograd nodes)
//   saved intermediates: (nc, G, n, ...) per layer, so one chunk of one worker is contiguous;
//   without a backward to come (keep_saved false) the same buffers hold one chunk (nc = 1).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

struct Options {
  int64_t chunk_size;
  bool gelu;
  bool residual;
  bool token_retrieval;
  double surprise_bound;  // c > 0: each token's surprise scaled to norm <= c; 0: no bound

  bool bounded() const { return surprise_bound > 0; }
};

Tensor activate_out(Tensor out, const Tensor& x, bool gelu) {
  return gelu ? at::gelu_out(out, x, "none") : at::silu_out(out, x);
}

// grad * act'(x) in one fused op.
Tensor activation_backward(const Tensor& grad, const Tensor& x, bool gelu) {
  return gelu ? at::gelu_backward(grad, x, "none") : at::silu_backward(grad, x);
}

const double kInvSqrt2Pi = 1.0 / std::sqrt(2.0 * M_PI);  // activations._INV_SQRT_2PI

// act''(x) * grad * carried, x = z_l (g, n, width): the term the error recursion adds to the
// gradient of z_l. After one vectorised ATen pass (sigmoid(x), or exp(-x^2 / 2)), one loop does
// what fused.py does in ~10 passes, with the same operations in the same order as
// activations.activation_second_derivative(x).mul_(grad).mul_(carried) (no FMA contraction in a
// baseline x86-64 build), so the bits are the same.
Tensor second_derivative_product(const Tensor& x, const Tensor& grad, const Tensor& carried, bool gelu) {
  const Tensor base = gelu ? at::exp(x * -0.5 * x) : at::sigmoid(x);
  const Tensor x_ = x.contiguous(), grad_ = grad.contiguous(), carried_ = carried.contiguous();
  Tensor out = at::empty_like(x_);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "second_derivative_product", [&] {
    const scalar_t* xs = x_.const_data_ptr<scalar_t>();
    const scalar_t* bs = base.const_data_ptr<scalar_t>();
    const scalar_t* gs = grad_.const_data_ptr<scalar_t>();
    const scalar_t* cs = carried_.const_data_ptr<scalar_t>();
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    const int64_t size = out.numel();
    const scalar_t one = 1, two = 2, inv_sqrt_2pi = static_cast<scalar_t>(kInvSqrt2Pi);
    if (gelu) {  // phi(x) (2 - x^2)
      for (int64_t i = 0; i < size; ++i) {
        scalar_t second = bs[i] * inv_sqrt_2pi * (two - xs[i] * xs[i]);
        os[i] = second * gs[i] * cs[i];
      }
    } else {  // s (1 - s) (2 + x (1 - 2 s))
      for (int64_t i = 0; i < size; ++i) {
        const scalar_t gate = bs[i];
        scalar_t second = gate * (one - gate) * (xs[i] * (one - gate * two) + two);
        os[i] = second * gs[i] * cs[i];
      }
    }
  });
  return out;
}

// pair.select(dim, 0) * w_0 + pair.select(dim, 1) * w_1 with weights (g, n, 2) per token, as
// fused._pair_combination: pair (g, n, d, 2) with dim -1 or (g, n, 2, d) with dim -2 -> (g, n, d).
Tensor pair_combination(const Tensor& pair, const Tensor& weights, int64_t dim) {
  return pair.select(dim, 0) * weights.select(-1, 0).unsqueeze(-1) +
         pair.select(dim, 1) * weights.select(-1, 1).unsqueeze(-1);
}

void pair_combination_out(Tensor out, const Tensor& pair, const Tensor& weights, int64_t dim) {
  at::mul_out(out, pair.select(dim, 0), weights.select(-1, 0).unsqueeze(-1));
  out.add_(pair.select(dim, 1) * weights.select(-1, 1).unsqueeze(-1));
}

// -(a @ b) in one op.
Tensor minus_bmm(const Tensor& a, const Tensor& b) {
  return at::baddbmm(at::empty({a.size(0), a.size(1), b.size(2)}, a.options()), a, b, 0, -1);
}

Tensor mT(const Tensor& x) { return x.transpose(-1, -2); }

// A layer whose output is narrower than its input scales its output side (fused._mix_outputs).
bool mix_outputs(const Tensor& state) { return state.size(1) < state.size(3); }

// The saved intermediates of every chunk, one list per kind, one entry per layer (fused.SavedChunk).
struct Saved {
  std::vector<Tensor> states;                     // L x (nc, G, d_out, 2, d_in): chunk-start state
  std::vector<Tensor> layer_inputs;               // L-1 x (nc, G, n, width): a_l, l >= 1 (a_0 = k)
  std::vector<Tensor> pre_activations;            // L-1 x (nc, G, n, width): z_l
  std::vector<Tensor> carried;                    // L-1 x (nc, G, n, width): delta_{l+1} W_{l+1} (scaled as errors)
  std::vector<Tensor> errors;                     // L x (nc, G, n, d_out): delta_l, times s under a bound
  std::vector<Tensor> surprise_scales;            // bound: 1 x (nc, G, n, 1): s_t = min(1, c / ||u_t||)
  std::vector<Tensor> retrieval_inputs;           // L-1 x (nc, G, n, d_in): h_l, l >= 1 (h_0 = q)
  std::vector<Tensor> retrieval_pre_activations;  // L-1 x (nc, G, n, width): r_l
  std::vector<Tensor> mixed_update;               // L x (nc, G, n, 2, d_in) or (nc, G, n, d_out, 2)
  std::vector<Tensor> mixed_retrieval;            // token: L x (nc, G, n, 2, d_in) or (nc, G, n, d_out, 2)
  std::vector<Tensor> grams;                      // token: L x (nc, G, n, n): h a^T
  std::vector<Tensor> scores;                     // token: L x (nc, G, n, n): C theta * h a^T

  using Kind = std::vector<Tensor> Saved::*;
  // Every kind, in the order flat() stores them.
  static constexpr Kind kKinds[] = {&Saved::states,       &Saved::layer_inputs,  &Saved::pre_activations,
                                    &Saved::carried,      &Saved::errors,        &Saved::surprise_scales,
                                    &Saved::retrieval_inputs,
                                    &Saved::retrieval_pre_activations,           &Saved::mixed_update,
                                    &Saved::mixed_retrieval, &Saved::grams,      &Saved::scores};

  // How many tensors of `kind` a memory of `depth` layers saves (see the layouts above).
  static int64_t count(Kind kind, int64_t depth, bool token_retrieval, bool bounded) {
    if (kind == &Saved::surprise_scales) return bounded ? 1 : 0;
    if (kind == &Saved::states || kind == &Saved::errors || kind == &Saved::mixed_update) return depth;
    if (kind == &Saved::mixed_retrieval || kind == &Saved::grams || kind == &Saved::scores) {
      return token_retrieval ? depth : 0;
    }
    return depth - 1;
  }

  std::vector<Tensor> flat() const {
    std::vector<Tensor> out;
    for (Kind kind : kKinds) out.insert(out.end(), (this->*kind).begin(), (this->*kind).end());
    return out;
  }

  static Saved unflat(const std::vector<Tensor>& flat, int64_t depth, bool token_retrieval, bool bounded) {
    Saved saved;
    size_t next = 0;
    for (Kind kind : kKinds) {
      const int64_t count = Saved::count(kind, depth, token_retrieval, bounded);
      TORCH_CHECK(next + count <= flat.size(), "memory_scan cpp: too few saved tensors");
      (saved.*kind).assign(flat.begin() + next, flat.begin() + next + count);
      next += count;
    }
    TORCH_CHECK(next == flat.size(), "memory_scan cpp: too many saved tensors");
    return saved;
  }
};

// weights: L x (G, d_out, d_in), for the shapes.
Saved allocate_saved(const std::vector<Tensor>& weights, int64_t slots, int64_t state_slots, int64_t groups,
                     int64_t n, bool token_retrieval, bool bounded, const at::TensorOptions& options) {
  Saved saved;
  if (bounded) saved.surprise_scales.push_back(at::empty({slots, groups, n, 1}, options));
  const int64_t depth = static_cast<int64_t>(weights.size());
  for (int64_t layer = 0; layer < depth; ++layer) {
    const int64_t d_out = weights[layer].size(1), d_in = weights[layer].size(2);
    saved.states.push_back(at::empty({state_slots, groups, d_out, 2, d_in}, options));
    saved.errors.push_back(at::empty({slots, groups, n, d_out}, options));
    auto mixed_shape = d_out < d_in ? std::vector<int64_t>{slots, groups, n, d_out, 2}  // as mix_outputs
                                    : std::vector<int64_t>{slots, groups, n, 2, d_in};
    saved.mixed_update.push_back(at::empty(mixed_shape, options));
    if (token_retrieval) {
      saved.mixed_retrieval.push_back(at::empty(mixed_shape, options));
      saved.grams.push_back(at::empty({slots, groups, n, n}, options));
      saved.scores.push_back(at::empty({slots, groups, n, n}, options));
    }
    if (layer < depth - 1) {
      for (auto* kind : {&saved.layer_inputs, &saved.pre_activations, &saved.carried, &saved.retrieval_inputs,
                         &saved.retrieval_pre_activations}) {
        kind->push_back(at::empty({slots, groups, n, d_out}, options));
      }
    }
  }
  return saved;
}

// x with dimension `selected` (none: -1) indexed at `index` and dropped, then the first ranges.size()
// of the remaining dimensions narrowed to {start, length}: one view op where chained select/narrow
// calls cost one dispatch each (~700 a chunk, ~0.3 us each). as_strided still checks the view
// against the storage's bounds.
Tensor subview(const Tensor& x, int64_t selected, int64_t index,
               std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
  c10::SmallVector<int64_t, 8> sizes, strides;
  int64_t offset = x.storage_offset();
  for (int64_t dim = 0; dim < x.dim(); ++dim) {
    if (dim == selected) {
      offset += index * x.stride(dim);
      continue;
    }
    sizes.push_back(x.size(dim));
    strides.push_back(x.stride(dim));
  }
  size_t dim = 0;
  for (const auto& [start, length] : ranges) {
    offset += start * strides[dim];
    sizes[dim] = length;
    ++dim;
  }
  return x.as_strided(sizes, strides, offset);
}

// One worker's view of one chunk: groups [g0, g0 + gn), tokens [start, start + len).
struct ChunkView {
  int64_t g0, gn, chunk, start, len;

  Tensor tokens(const Tensor& x) const { return subview(x, -1, 0, {{g0, gn}, {start, len}}); }
  // A (slots, G, n, ...) buffer at `slot`.
  Tensor slot(const Tensor& x, int64_t index) const { return subview(x, 0, index, {{g0, gn}, {0, len}}); }
  Tensor square(const Tensor& x, int64_t index) const { return subview(x, 0, index, {{g0, gn}, {0, len}, {0, len}}); }
  Tensor state(const Tensor& x, int64_t index) const { return subview(x, 0, index, {{g0, gn}}); }
  // The gates of this chunk, (G, nc, n, ...).
  Tensor gate_rows(const Tensor& x) const { return subview(x, 1, chunk, {{g0, gn}, {0, len}}); }
  Tensor gate_square(const Tensor& x) const { return subview(x, 1, chunk, {{g0, gn}, {0, len}, {0, len}}); }
  Tensor gate(const Tensor& x) const { return subview(x, 1, chunk, {{g0, gn}}); }
};

struct Gates {
  Tensor retrieval_decays, update_scores, state_decays, state_rows;
};

struct ChunkGates {
  Tensor retrieval_decays, update_scores, state_decays, state_rows;

  ChunkGates(const Gates& gates, const ChunkView& view)
      : retrieval_decays(view.gate_rows(gates.retrieval_decays)),
        update_scores(view.gate_square(gates.update_scores)),
        state_decays(view.gate(gates.state_decays)),
        state_rows(view.gate_rows(gates.state_rows)) {}

  // [A_n, P_n] as (g, 1, 2, 1) and E_n as (g, 1, 1).
  Tensor keep() const { return state_decays.slice(1, 0, 3, 2).unsqueeze(1).unsqueeze(-1); }
  Tensor carry_momentum() const { return state_decays.select(1, 1).unsqueeze(-1).unsqueeze(-1); }
};

// fused._forward_chunk for one worker's groups, writing into the saved buffers at `slot`.
void forward_chunk(const std::vector<Tensor>& states, const std::vector<Tensor>& next_states, const Tensor& q,
                   const Tensor& k, const Tensor& v, Tensor y, const ChunkGates& gates, Saved& saved,
                   const ChunkView& view, int64_t slot, const Options& options) {
  const int64_t depth = static_cast<int64_t>(states.size());
  const int64_t groups = view.gn, n = view.len;
  std::vector<Tensor> layer_inputs{k}, pre_activations, errors(depth);
  Tensor hidden = k;
  for (int64_t layer = 0; layer < depth; ++layer) {
    const Tensor weight = states[layer].select(2, 0);
    if (layer < depth - 1) {
      Tensor pre = view.slot(saved.pre_activations[layer], slot);
      at::bmm_out(pre, hidden, mT(weight));
      pre_activations.push_back(pre);
      hidden = activate_out(view.slot(saved.layer_inputs[layer], slot), pre, options.gelu);
      layer_inputs.push_back(hidden);
    } else {
      Tensor error = view.slot(saved.errors[layer], slot);
      at::bmm_out(error, hidden, mT(weight));
      if (options.residual) error.add_(k);
      errors[layer] = error.sub_(v);
    }
  }
  for (int64_t layer = depth - 2; layer >= 0; --layer) {
    Tensor carry = view.slot(saved.carried[layer], slot);
    at::bmm_out(carry, errors[layer + 1], states[layer + 1].select(2, 0));
    Tensor error = view.slot(saved.errors[layer], slot);
    if (options.gelu) {
      at::gelu_backward_out(error, carry, pre_activations[layer], "none");
    } else {
      at::silu_backward_out(error, carry, pre_activations[layer]);
    }
    errors[layer] = error;
  }
  if (options.bounded()) {
    // fused.py's surprise_scale: ||u_t||^2 = sum_l ||delta_l||^2 ||a_{l-1}||^2, s = min(1, c / ||u_t||);
    // the errors and carried terms of every layer are scaled once computed (the recursion is linear).
    Tensor squared_norm = errors[0].square().sum(-1) * layer_inputs[0].square().sum(-1);
    for (int64_t layer = 1; layer < depth; ++layer) {
      squared_norm = squared_norm + errors[layer].square().sum(-1) * layer_inputs[layer].square().sum(-1);
    }
    Tensor scale = view.slot(saved.surprise_scales[0], slot);
    scale.copy_((squared_norm.rsqrt() * options.surprise_bound).clamp_max_(1).unsqueeze(-1));
    for (int64_t layer = 0; layer < depth; ++layer) {
      errors[layer].mul_(scale);
      if (layer < depth - 1) view.slot(saved.carried[layer], slot).mul_(scale);
    }
  }

  hidden = q;
  for (int64_t layer = 0; layer < depth; ++layer) {
    const Tensor& state = states[layer];
    const int64_t d_out = state.size(1), d_in = state.size(3);
    Tensor out = layer < depth - 1 ? view.slot(saved.retrieval_pre_activations[layer], slot) : y;
    if (options.token_retrieval) {
      Tensor gram = view.square(saved.grams[layer], slot);
      at::bmm_out(gram, hidden, mT(layer_inputs[layer]));
      Tensor score = view.square(saved.scores[layer], slot);
      at::mul_out(score, gates.update_scores, gram);
      Tensor mixed = view.slot(saved.mixed_retrieval[layer], slot);
      if (mix_outputs(state)) {
        Tensor mixed_flat = mixed.view({groups, n, 2 * d_out});
        at::bmm_out(mixed_flat, hidden, mT(state.view({groups, 2 * d_out, d_in})));
        pair_combination_out(out, mixed, gates.retrieval_decays, -1);
      } else {
        at::mul_out(mixed, gates.retrieval_decays.unsqueeze(-1), hidden.unsqueeze(-2));
        at::bmm_out(out, mixed.view({groups, n, 2 * d_in}), mT(state.view({groups, d_out, 2 * d_in})));
      }
      out.baddbmm_(score, errors[layer], 1, -1);
    } else {
      at::bmm_out(out, hidden, mT(state.select(2, 0)));
    }
    if (layer < depth - 1) {
      hidden = activate_out(view.slot(saved.retrieval_inputs[layer], slot), out, options.gelu);
    }
  }
  if (options.residual) y.add_(q);

  const Tensor keep = gates.keep(), carry_momentum = gates.carry_momentum();
  for (int64_t layer = 0; layer < depth; ++layer) {
    const Tensor& state = states[layer];
    const int64_t d_out = state.size(1), d_in = state.size(3);
    Tensor next_state = next_states[layer];
    at::mul_out(next_state, state, keep);
    next_state.select(2, 0).addcmul_(state.select(2, 1), carry_momentum);
    Tensor mixed = view.slot(saved.mixed_update[layer], slot);
    if (mix_outputs(state)) {
      at::mul_out(mixed, errors[layer].unsqueeze(-1), gates.state_rows.unsqueeze(-2));
      next_state.view({groups, 2 * d_out, d_in})
          .baddbmm_(mT(mixed.view({groups, n, 2 * d_out})), layer_inputs[layer], 1, -1);
    } else {
      at::mul_out(mixed, gates.state_rows.unsqueeze(-1), layer_inputs[layer].unsqueeze(-2));
      next_state.view({groups, d_out, 2 * d_in}).baddbmm_(mT(errors[layer]), mixed.view({groups, n, 2 * d_in}), 1, -1);
    }
  }
}

// The per-chunk views of the saved intermediates that fused._backward_chunk reads.
// Its layer_inputs and retrieval_inputs start with k and q (a_0, h_0), which are not saved apart.
struct ChunkSaved : Saved {
  ChunkSaved(const Saved& saved, const ChunkView& view, const Tensor& q, const Tensor& k) {
    const int64_t c = view.chunk;
    auto slots = [&](const std::vector<Tensor>& kind, std::vector<Tensor>& out) {
      for (const Tensor& x : kind) out.push_back(view.slot(x, c));
    };
    for (const Tensor& x : saved.states) states.push_back(view.state(x, c));
    layer_inputs.push_back(view.tokens(k));
    slots(saved.layer_inputs, layer_inputs);
    retrieval_inputs.push_back(view.tokens(q));
    slots(saved.retrieval_inputs, retrieval_inputs);
    slots(saved.pre_activations, pre_activations);
    slots(saved.carried, carried);
    slots(saved.errors, errors);
    slots(saved.surprise_scales, surprise_scales);
    slots(saved.retrieval_pre_activations, retrieval_pre_activations);
    slots(saved.mixed_update, mixed_update);
    slots(saved.mixed_retrieval, mixed_retrieval);
    for (const Tensor& x : saved.grams) grams.push_back(view.square(x, c));
    for (const Tensor& x : saved.scores) scores.push_back(view.square(x, c));
  }
};

// fused._backward_chunk for one worker's groups: writes the chunk's rows of grad q, k, v,
// accumulates into its gate gradients, updates grad_states (g, d_out, 2, d_in) in place.
void backward_chunk(const ChunkSaved& saved, const Tensor& grad_y, std::vector<Tensor>& grad_states,
                    const ChunkGates& gates, Tensor grad_q, Tensor grad_k, Tensor grad_v, const ChunkGates& grad_gates,
                    const Options& options) {
  const auto& states = saved.states;
  const int64_t depth = static_cast<int64_t>(states.size());
  const int64_t groups = grad_y.size(0), n = grad_y.size(1);
  std::vector<Tensor> grad_errors(depth), grad_inputs(depth);
  Tensor grad_state_decays = at::zeros({groups, 2, 2}, grad_y.options());
  Tensor grad_state_rows = grad_gates.state_rows;
  const Tensor keep = gates.keep(), carry_momentum = gates.carry_momentum();
  // The state update: next = [A_n W + E_n S, P_n S] - delta^T [C_n theta a, D_eta,n theta a].
  for (int64_t layer = 0; layer < depth; ++layer) {
    const Tensor& state = states[layer];
    Tensor grad = grad_states[layer];
    const int64_t d_out = state.size(1), d_in = state.size(3);
    // <grad_a, state_b> for a, b in {W, S}: (2 x d_in) @ (d_in x 2) per output row, summed.
    grad_state_decays +=
        at::bmm(grad.view({-1, 2, d_in}), mT(state.reshape({-1, 2, d_in}))).view({groups, d_out, 2, 2}).sum(1);
    Tensor grad_flat = grad.view({groups, d_out, 2 * d_in});
    const Tensor& layer_input = saved.layer_inputs[layer];
    const Tensor& mixed = saved.mixed_update[layer];
    if (mix_outputs(state)) {
      Tensor grad_rows_flat = grad.view({groups, 2 * d_out, d_in});
      Tensor grad_mixed = minus_bmm(layer_input, mT(grad_rows_flat)).view({groups, n, d_out, 2});
      grad_errors[layer] = pair_combination(grad_mixed, gates.state_rows, -1);
      grad_state_rows += (grad_mixed * saved.errors[layer].unsqueeze(-1)).sum(-2);
      grad_inputs[layer] = minus_bmm(mixed.view({groups, n, 2 * d_out}), grad_rows_flat);
    } else {
      grad_errors[layer] = minus_bmm(mixed.view({groups, n, 2 * d_in}), mT(grad_flat));
      Tensor grad_mixed = minus_bmm(saved.errors[layer], grad_flat).view({groups, n, 2, d_in});
      grad_inputs[layer] = pair_combination(grad_mixed, gates.state_rows, -2);
      grad_state_rows += (grad_mixed * layer_input.unsqueeze(-2)).sum(-1);
    }
    // grad W^c = A_n grad W', grad S^c = P_n grad S' + E_n grad W', after every read of grad.
    grad.select(2, 1).mul_(keep.select(2, 1)).addcmul_(grad.select(2, 0), carry_momentum);
    grad.select(2, 0).mul_(keep.select(2, 0));
  }

  Tensor grad_retrieval_decays = grad_gates.retrieval_decays;
  Tensor grad_update_scores = grad_gates.update_scores;
  Tensor grad_hidden = grad_y;
  for (int64_t layer = depth - 1; layer >= 0; --layer) {
    const Tensor& state = states[layer];
    const int64_t d_out = state.size(1), d_in = state.size(3);
    Tensor grad_out = layer == depth - 1
                          ? grad_hidden
                          : activation_backward(grad_hidden, saved.retrieval_pre_activations[layer], options.gelu);
    const Tensor& hidden = saved.retrieval_inputs[layer];
    if (options.token_retrieval) {
      const Tensor& mixed = saved.mixed_retrieval[layer];
      if (mix_outputs(state)) {
        grad_retrieval_decays += (mixed * grad_out.unsqueeze(-1)).sum(-2);
        Tensor grad_mixed =
            (grad_out.unsqueeze(-1) * gates.retrieval_decays.unsqueeze(-2)).view({groups, n, 2 * d_out});
        grad_states[layer].view({groups, 2 * d_out, d_in}).baddbmm_(mT(grad_mixed), hidden);
        grad_hidden = at::bmm(grad_mixed, state.view({groups, 2 * d_out, d_in}));
      } else {
        grad_states[layer].view({groups, d_out, 2 * d_in}).baddbmm_(mT(grad_out), mixed.view({groups, n, 2 * d_in}));
        Tensor grad_mixed = at::bmm(grad_out, state.view({groups, d_out, 2 * d_in})).view({groups, n, 2, d_in});
        grad_retrieval_decays += (grad_mixed * hidden.unsqueeze(-2)).sum(-1);
        grad_hidden = pair_combination(grad_mixed, gates.retrieval_decays, -2);
      }
      Tensor minus_grad_scores = at::bmm(grad_out, mT(saved.errors[layer]));
      grad_errors[layer].baddbmm_(mT(saved.scores[layer]), grad_out, 1, -1);
      grad_update_scores.addcmul_(minus_grad_scores, saved.grams[layer], -1);
      Tensor minus_grad_gram = minus_grad_scores * gates.update_scores;
      grad_hidden.baddbmm_(minus_grad_gram, saved.layer_inputs[layer], 1, -1);
      grad_inputs[layer].baddbmm_(mT(minus_grad_gram), hidden, 1, -1);
    } else {
      grad_states[layer].select(2, 0).baddbmm_(mT(grad_out), hidden);
      grad_hidden = at::bmm(grad_out, state.select(2, 0));
    }
  }
  if (options.residual) {
    at::add_out(grad_q, grad_hidden, grad_y);
  } else {
    grad_q.copy_(grad_hidden);
  }

  // The errors: delta_l = (delta_{l+1} W_{l+1}) * act'(z_l).
  std::vector<Tensor> grad_pre_activations;
  for (int64_t layer = 0; layer < depth - 1; ++layer) {
    const Tensor& grad_error = grad_errors[layer];
    const Tensor& pre_activation = saved.pre_activations[layer];
    Tensor grad_carry = activation_backward(grad_error, pre_activation, options.gelu);
    grad_pre_activations.push_back(
        second_derivative_product(pre_activation, grad_error, saved.carried[layer], options.gelu));
    grad_errors[layer + 1].baddbmm_(grad_carry, mT(states[layer + 1].select(2, 0)));
    grad_states[layer + 1].select(2, 0).baddbmm_(mT(saved.errors[layer + 1]), grad_carry);
  }

  // The store pass: out = M_W(k), delta_L = s (out - v) (s = 1 without a bound, not differentiated).
  Tensor grad_pre = grad_errors[depth - 1];
  if (!saved.surprise_scales.empty()) grad_pre.mul_(saved.surprise_scales[0]);
  at::neg_out(grad_v, grad_pre);
  if (options.residual) grad_k.copy_(grad_pre);
  for (int64_t layer = depth - 1; layer >= 0; --layer) {
    const Tensor weight = states[layer].select(2, 0);
    grad_states[layer].select(2, 0).baddbmm_(mT(grad_pre), saved.layer_inputs[layer]);
    Tensor grad_input = grad_inputs[layer].baddbmm_(grad_pre, weight);
    if (layer > 0) {
      grad_pre = activation_backward(grad_input, saved.pre_activations[layer - 1], options.gelu);
      grad_pre += grad_pre_activations[layer - 1];
    } else if (options.residual) {
      grad_k.add_(grad_input);
    } else {
      grad_k.copy_(grad_input);
    }
  }
  // [A_n, E_n, P_n] <- entries (0, 0), (0, 1), (1, 1) of <grad_a, state_b>.
  Tensor flat = grad_state_decays.view({groups, 4});
  grad_gates.state_decays.narrow(1, 0, 2).copy_(flat.narrow(1, 0, 2));
  grad_gates.state_decays.select(1, 2).copy_(flat.select(1, 3));
}

Options make_options(int64_t chunk_size, const std::string& activation, bool residual, bool token_retrieval,
                     double surprise_bound) {
  TORCH_CHECK(activation == "silu" || activation == "gelu", "memory_scan cpp: activation must be silu or gelu, got ",
              activation);
  TORCH_CHECK(std::isfinite(surprise_bound) && surprise_bound >= 0,
              "memory_scan cpp: surprise_bound must be finite and >= 0, got ", surprise_bound);
  return Options{chunk_size, activation == "gelu", residual, token_retrieval, surprise_bound};
}

// Runs `body(g0, gn)` on contiguous slices of the G groups, one per intra-op thread.
template <typename Body>
void parallel_over_groups(int64_t groups, const Body& body) {
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    // Below autograd: the inputs may require grad, the workers only compute values.
    at::AutoDispatchBelowADInplaceOrView guard;
    body(begin, end - begin);
  });
}

// Returns [y, next weights (L)..., next momentum (L)..., saved (flat, keep_saved only)...].
std::vector<Tensor> scan_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& retrieval_decays,
                                 const Tensor& update_scores, const Tensor& state_decays, const Tensor& state_rows,
                                 const std::vector<Tensor>& weights, const std::vector<Tensor>& momentum,
                                 int64_t chunk_size, const std::string& activation, bool residual,
                                 bool token_retrieval, bool keep_saved, double surprise_bound) {
  const Options options = make_options(chunk_size, activation, residual, token_retrieval, surprise_bound);
  TORCH_CHECK(weights.size() == momentum.size(), "memory_scan cpp: ", weights.size(), " weights but ",
              momentum.size(), " momentum tensors");
  const Gates gates{retrieval_decays, update_scores, state_decays, state_rows};
  const int64_t groups = q.size(0), seq_len = q.size(1), depth = static_cast<int64_t>(weights.size());
  const int64_t n_chunks = (seq_len + chunk_size - 1) / chunk_size;
  const int64_t n = std::min(chunk_size, seq_len);
  // Without a backward the buffers hold one chunk, and the states alternate between two slots.
  Saved saved = allocate_saved(weights, keep_saved ? n_chunks : 1, keep_saved ? n_chunks : 2, groups, n,
                               token_retrieval, options.bounded(), q.options());
  Tensor y = at::empty_like(q, at::MemoryFormat::Contiguous);
  std::vector<Tensor> final_states, weights_out, momentum_out;
  for (int64_t layer = 0; layer < depth; ++layer) {
    const Tensor& weight = weights[layer];
    final_states.push_back(at::empty({groups, weight.size(1), 2, weight.size(2)}, weight.options()));
    weights_out.push_back(at::empty_like(weight, at::MemoryFormat::Contiguous));
    momentum_out.push_back(at::empty_like(momentum[layer], at::MemoryFormat::Contiguous));
  }

  parallel_over_groups(groups, [&](int64_t g0, int64_t gn) {
    for (int64_t layer = 0; layer < depth; ++layer) {
      Tensor first = saved.states[layer].select(0, 0).narrow(0, g0, gn);
      first.select(2, 0).copy_(weights[layer].narrow(0, g0, gn));
      first.select(2, 1).copy_(momentum[layer].narrow(0, g0, gn));
    }
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t start = chunk * chunk_size;
      const ChunkView view{g0, gn, chunk, start, std::min(chunk_size, seq_len - start)};
      const int64_t slot = keep_saved ? chunk : 0;
      const int64_t state_slot = keep_saved ? chunk : chunk % 2, next_slot = keep_saved ? chunk + 1 : (chunk + 1) % 2;
      std::vector<Tensor> chunk_states, next_states;
      for (int64_t layer = 0; layer < depth; ++layer) {
        chunk_states.push_back(view.state(saved.states[layer], state_slot));
        next_states.push_back(chunk == n_chunks - 1 ? final_states[layer].narrow(0, g0, gn)
                                                    : view.state(saved.states[layer], next_slot));
      }
      forward_chunk(chunk_states, next_states, view.tokens(q), view.tokens(k), view.tokens(v), view.tokens(y),
                    ChunkGates(gates, view), saved, view, slot, options);
    }
    for (int64_t layer = 0; layer < depth; ++layer) {
      const Tensor last = final_states[layer].narrow(0, g0, gn);
      weights_out[layer].narrow(0, g0, gn).copy_(last.select(2, 0));
      momentum_out[layer].narrow(0, g0, gn).copy_(last.select(2, 1));
    }
  });
  std::vector<Tensor> out{y};
  out.insert(out.end(), weights_out.begin(), weights_out.end());
  out.insert(out.end(), momentum_out.begin(), momentum_out.end());
  if (keep_saved) {
    std::vector<Tensor> flat = saved.flat();
    out.insert(out.end(), flat.begin(), flat.end());
  }
  return out;
}

// Returns [grad q, grad k, grad v, grad gates (4)..., grad weights (L)..., grad momentum (L)...]; the
// state gradients are the two halves of the loop's [W | S] buffers (strided views).
std::vector<Tensor> scan_backward(const std::vector<Tensor>& saved_flat, const Tensor& q, const Tensor& k,
                                  const Tensor& retrieval_decays, const Tensor& update_scores,
                                  const Tensor& state_decays, const Tensor& state_rows, const Tensor& grad_y,
                                  const std::vector<Tensor>& grad_weights, const std::vector<Tensor>& grad_momentum,
                                  int64_t chunk_size, const std::string& activation, bool residual,
                                  bool token_retrieval, double surprise_bound) {
  const Options options = make_options(chunk_size, activation, residual, token_retrieval, surprise_bound);
  TORCH_CHECK(grad_weights.size() == grad_momentum.size(), "memory_scan cpp: ", grad_weights.size(),
              " weight gradients but ", grad_momentum.size(), " momentum gradients");
  const Gates gates{retrieval_decays, update_scores, state_decays, state_rows};
  const int64_t groups = q.size(0), seq_len = q.size(1), depth = static_cast<int64_t>(grad_weights.size());
  const int64_t n_chunks = (seq_len + chunk_size - 1) / chunk_size;
  const Saved saved = Saved::unflat(saved_flat, depth, token_retrieval, options.bounded());
  std::vector<Tensor> grad_states;  // [grad W | grad S] (G, d_out, 2, d_in), updated in place chunk by chunk
  for (const Tensor& grad : grad_weights) {
    grad_states.push_back(at::empty({groups, grad.size(1), 2, grad.size(2)}, grad.options()));
  }
  Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor grad_k = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor grad_v = at::empty_like(q, at::MemoryFormat::Contiguous);
  const Gates grad_gates{at::zeros_like(retrieval_decays), at::zeros_like(update_scores), at::zeros_like(state_decays),
                         at::zeros_like(state_rows)};

  parallel_over_groups(groups, [&](int64_t g0, int64_t gn) {
    std::vector<Tensor> worker_grad_states;
    for (int64_t layer = 0; layer < depth; ++layer) {
      Tensor grad = grad_states[layer].narrow(0, g0, gn);
      grad.select(2, 0).copy_(grad_weights[layer].narrow(0, g0, gn));
      grad.select(2, 1).copy_(grad_momentum[layer].narrow(0, g0, gn));
      worker_grad_states.push_back(grad);
    }
    for (int64_t chunk = n_chunks - 1; chunk >= 0; --chunk) {
      const int64_t start = chunk * chunk_size;
      const ChunkView view{g0, gn, chunk, start, std::min(chunk_size, seq_len - start)};
      backward_chunk(ChunkSaved(saved, view, q, k), view.tokens(grad_y), worker_grad_states, ChunkGates(gates, view),
                     view.tokens(grad_q), view.tokens(grad_k), view.tokens(grad_v), ChunkGates(grad_gates, view),
                     options);
    }
  });
  std::vector<Tensor> out{grad_q, grad_k, grad_v, grad_gates.retrieval_decays, grad_gates.update_scores,
                          grad_gates.state_decays, grad_gates.state_rows};
  for (const Tensor& grad : grad_states) out.push_back(grad.select(2, 0));
  for (const Tensor& grad : grad_states) out.push_back(grad.select(2, 1));
  return out;
}

}  // namespace

void define_gate_ops(pybind11::module_& module);  // gates.cpp: the gate products, one extension with this file
void define_conv_feature_ops(pybind11::module_& module);  // conv_features.cpp: the memory's q, k, v features

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &scan_forward, "memory_scan chunk loop, forward (fused.py's math), parallel over groups");
  module.def("backward", &scan_backward, "memory_scan chunk loop, backward (fused.py's math), parallel over groups");
  define_gate_ops(module);
  define_conv_feature_ops(module);
}
