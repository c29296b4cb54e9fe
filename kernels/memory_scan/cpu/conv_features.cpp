// The memory's q, k, v features in one pass each way: silu(causal depthwise conv(x)), optionally
// L2-normalised per head (kernels/conv_features.py holds the reference these equal).
//
// Layouts: padded (B, K-1+T, C), time-major, the K-1 tail steps first; weight (C, K); the output
// and its gradient (B, T, C), channels grouped by head (head_dim contiguous channels each).
// Sums run in float (double for double inputs); the sigmoid is ATen's (vectorised), the rest is
// one loop over the rows (b, t). At T = 128 (MAC runs the memory per 128-token segment) the ~15
// ATen ops each way of the reference cost several times the arithmetic they do.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::Tensor;

constexpr double kNormEps = 1e-12;  // F.normalize's default eps
constexpr int64_t kRowBlock = 64;   // rows per weight-gradient partial: a fixed split, so the sum's order
                                    // (and its bits) does not depend on the thread count

at::ScalarType compute_type(const Tensor& padded) {
  return padded.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// conv[b, t, c] = sum_k taps[k, c] padded[b, t + k, c], in the compute type (B, T, C).
template <typename scalar_t, typename acc_t>
Tensor causal_conv(const Tensor& padded, const Tensor& taps, int64_t seq_len) {
  const int64_t batch = padded.size(0), steps = padded.size(1), channels = padded.size(2), kernel = taps.size(0);
  Tensor conv = at::empty({batch, seq_len, channels}, padded.options().dtype(compute_type(padded)));
  const scalar_t* xs = padded.const_data_ptr<scalar_t>();
  const acc_t* ws = taps.const_data_ptr<acc_t>();
  acc_t* out = conv.mutable_data_ptr<acc_t>();
  at::parallel_for(0, batch * seq_len, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / seq_len, t = row % seq_len;
      acc_t* o = out + row * channels;
      const scalar_t* x0 = xs + (b * steps + t) * channels;
      for (int64_t c = 0; c < channels; ++c) o[c] = ws[c] * static_cast<acc_t>(x0[c]);
      for (int64_t k = 1; k < kernel; ++k) {
        const scalar_t* x = x0 + k * channels;
        const acc_t* w = ws + k * channels;
        for (int64_t c = 0; c < channels; ++c) o[c] += w[c] * static_cast<acc_t>(x[c]);
      }
    }
  });
  return conv;
}

// The taps (K, C) in the compute type: each tap a contiguous channel vector.
Tensor taps_of(const Tensor& weight, const Tensor& padded) {
  return weight.t().to(compute_type(padded)).contiguous();
}

// feature = silu(z) = z s of one head's `group` channels (s = sigmoid(z)); returns the sum of squares.
template <typename acc_t>
acc_t silu_head(const acc_t* z, const acc_t* s, acc_t* feature, int64_t group) {
  acc_t squares = 0;
  for (int64_t i = 0; i < group; ++i) {
    feature[i] = z[i] * s[i];
    squares += feature[i] * feature[i];
  }
  return squares;
}

void check_inputs(const Tensor& padded, const Tensor& weight, int64_t head_dim) {
  TORCH_CHECK(padded.device().is_cpu() && weight.device().is_cpu(), "conv_features: the C++ op takes CPU tensors");
  TORCH_CHECK(padded.dim() == 3 && weight.dim() == 2 && padded.size(2) == weight.size(0),
              "conv_features: padded (B, K-1+T, C) and weight (C, K) expected");
  TORCH_CHECK(padded.size(1) >= weight.size(1), "conv_features: padded holds fewer than K steps");
  TORCH_CHECK(head_dim >= 0 && (head_dim == 0 || padded.size(2) % head_dim == 0),
              "conv_features: head_dim must divide the channels (0: no normalisation)");
}

// silu(conv) per row, normalised per head when head_dim > 0 -> (B, T, C) in padded's dtype.
Tensor features_forward(const Tensor& padded_in, const Tensor& weight, int64_t head_dim) {
  check_inputs(padded_in, weight, head_dim);
  const Tensor padded = padded_in.contiguous();
  const int64_t seq_len = padded.size(1) - weight.size(1) + 1, channels = padded.size(2);
  Tensor out = at::empty({padded.size(0), seq_len, channels}, padded.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, padded.scalar_type(), "conv_features_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor conv = causal_conv<scalar_t, acc_t>(padded, taps_of(weight, padded), seq_len);
    const Tensor gate = at::sigmoid(conv);
    const acc_t* zs = conv.const_data_ptr<acc_t>();
    const acc_t* ss = gate.const_data_ptr<acc_t>();
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    const int64_t group = head_dim > 0 ? head_dim : channels;
    at::parallel_for(0, conv.numel() / group, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> feature(group);
      for (int64_t h = begin; h < end; ++h) {
        const acc_t squares = silu_head(zs + h * group, ss + h * group, feature.data(), group);
        const acc_t scale = head_dim > 0 ? acc_t(1) / std::max(std::sqrt(squares), acc_t(kNormEps)) : acc_t(1);
        scalar_t* o = os + h * group;
        for (int64_t i = 0; i < group; ++i) o[i] = static_cast<scalar_t>(feature[i] * scale);
      }
    });
  });
  return out;
}

// Returns [grad_padded (padded's dtype), grad_weight (weight's dtype)].
std::vector<Tensor> features_backward(const Tensor& grad_out_in, const Tensor& padded_in, const Tensor& weight,
                                      int64_t head_dim) {
  check_inputs(padded_in, weight, head_dim);
  const Tensor padded = padded_in.contiguous(), grad_out = grad_out_in.contiguous();
  const int64_t batch = padded.size(0), steps = padded.size(1), channels = padded.size(2);
  const int64_t kernel = weight.size(1), seq_len = steps - kernel + 1, rows = batch * seq_len;
  Tensor grad_padded = at::empty_like(padded);
  Tensor grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, padded.scalar_type(), "conv_features_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor taps = taps_of(weight, padded);
    Tensor grad_conv = causal_conv<scalar_t, acc_t>(padded, taps, seq_len);  // conv, then its gradient in place
    const Tensor gate = at::sigmoid(grad_conv);
    acc_t* gz = grad_conv.mutable_data_ptr<acc_t>();
    const acc_t* ss = gate.const_data_ptr<acc_t>();
    const scalar_t* gs = grad_out.const_data_ptr<scalar_t>();
    const int64_t group = head_dim > 0 ? head_dim : channels;
    // d out / d conv per head: through the normalisation (when on), then silu'(z) = s (1 + z (1 - s)).
    at::parallel_for(0, rows * channels / group, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> feature(group);
      for (int64_t h = begin; h < end; ++h) {
        acc_t* z = gz + h * group;
        const acc_t* s = ss + h * group;
        const scalar_t* g = gs + h * group;
        const acc_t norm = std::sqrt(silu_head(z, s, feature.data(), group));
        // Below eps F.normalize divides by eps, a constant: the gradient is g / eps.
        const bool scaled = head_dim > 0 && norm >= acc_t(kNormEps);
        const acc_t inverse = head_dim == 0 ? acc_t(1) : acc_t(1) / std::max(norm, acc_t(kNormEps));
        acc_t projection = 0;  // <g, out> of the head
        if (scaled) {
          for (int64_t i = 0; i < group; ++i) projection += static_cast<acc_t>(g[i]) * feature[i];
          projection *= inverse * inverse;
        }
        for (int64_t i = 0; i < group; ++i) {
          const acc_t grad_feature = (static_cast<acc_t>(g[i]) - feature[i] * projection) * inverse;
          z[i] = grad_feature * s[i] * (acc_t(1) + z[i] * (acc_t(1) - s[i]));
        }
      }
    });
    // grad_padded[b, p, c] = sum_k grad_conv[b, p - k, c] taps[k, c] over 0 <= p - k < T: gathered per
    // row of padded, so no two workers write one row.
    const acc_t* ws = taps.const_data_ptr<acc_t>();
    scalar_t* gp = grad_padded.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * steps, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(channels);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / steps, p = row % steps;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t k = std::max<int64_t>(0, p - seq_len + 1); k <= std::min(p, kernel - 1); ++k) {
          const acc_t* g = gz + (b * seq_len + p - k) * channels;
          const acc_t* w = ws + k * channels;
          for (int64_t c = 0; c < channels; ++c) sum[c] += g[c] * w[c];
        }
        scalar_t* out = gp + row * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(sum[c]);
      }
    });
    // grad_taps[k, c] = sum over rows (b, t) of grad_conv[b, t, c] padded[b, t + k, c]: one partial per
    // fixed block of rows, then the partials summed in block order.
    const int64_t n_blocks = (rows + kRowBlock - 1) / kRowBlock;
    Tensor partials = at::zeros({n_blocks, kernel, channels}, grad_conv.options());
    acc_t* ps = partials.mutable_data_ptr<acc_t>();
    const scalar_t* xs = padded.const_data_ptr<scalar_t>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        acc_t* partial = ps + block * kernel * channels;
        for (int64_t row = block * kRowBlock; row < std::min(rows, (block + 1) * kRowBlock); ++row) {
          const int64_t b = row / seq_len, t = row % seq_len;
          const acc_t* g = gz + row * channels;
          for (int64_t k = 0; k < kernel; ++k) {
            const scalar_t* x = xs + (b * steps + t + k) * channels;
            acc_t* p = partial + k * channels;
            for (int64_t c = 0; c < channels; ++c) p[c] += g[c] * static_cast<acc_t>(x[c]);
          }
        }
      }
    });
    Tensor grad_taps = at::empty({kernel, channels}, grad_conv.options());
    acc_t* gt = grad_taps.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < kernel * channels; ++i) {
      acc_t total = ps[i];
      for (int64_t block = 1; block < n_blocks; ++block) total += ps[block * kernel * channels + i];
      gt[i] = total;
    }
    grad_weight = grad_taps.t().to(weight.scalar_type()).contiguous();
  });
  return {grad_padded, grad_weight};
}

}  // namespace

// Called by memory_scan.cpp's PYBIND11_MODULE: the extension stays one module.
void define_conv_feature_ops(pybind11::module_& module) {
  module.def("conv_features_forward", &features_forward,
             "silu(causal depthwise conv), per-head L2-normalised when head_dim > 0: padded (B, K-1+T, C), "
             "weight (C, K) -> (B, T, C)");
  module.def("conv_features_backward", &features_backward,
             "the gradients of padded and weight from that of conv_features_forward's output");
}
