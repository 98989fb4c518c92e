// CPU kernel of slao::scaled_merge_: for every layer i, in place,
//   merged[i] ← merged[i] + lam·(fine_tuned[i] − merged[i])
// computed in fp32 (fp64 for fp64 tensors) as (1 − lam)·m + lam·f, which is
// exact at lam = 1 (SLAO's first task: B_merge = B_ft) and lam = 0. All layers go through one parallel
// region over fixed-size chunks, so hundreds of small adapter tensors cost one
// fork/join, not one each. With check_finite a first read-only pass looks for
// NaN/Inf in the results; nothing is written if it finds one.
//
// Schema and fake kernel: slao_kernels/_ops.py. Reference: slao_kernels/reference.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace slao {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 1 << 15;  // elements per unit of parallel work

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunks_of(at::TensorList ts) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) {
    for (int64_t b = 0; b < ts[i].numel(); b += kChunk) chunks.push_back({i, b, std::min(b + kChunk, ts[i].numel())});
  }
  return chunks;
}

// Tensors of one dtype, with their positions in the caller's lists.
struct Group {
  at::ScalarType dtype;
  std::vector<Tensor> merged, fine_tuned;
  std::vector<int64_t> index;
};

// Position (in the caller's list) of a tensor whose merge is not finite, or -1.
template <typename scalar_t>
int64_t find_nonfinite(const Group& g, const std::vector<Chunk>& chunks, double lam_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t lam = static_cast<acc_t>(lam_d), keep = acc_t(1) - lam;
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1 && bad.load(std::memory_order_relaxed) < 0; ++c) {
      const Chunk& ch = chunks[c];
      const scalar_t* m = g.merged[ch.tensor].const_data_ptr<scalar_t>();
      const scalar_t* f = g.fine_tuned[ch.tensor].const_data_ptr<scalar_t>();
      bool finite = true;
      for (int64_t j = ch.begin; j < ch.end; ++j) {
        // Checked as it would be stored: a 16-bit store can overflow to Inf.
        const scalar_t stored = static_cast<scalar_t>(keep * static_cast<acc_t>(m[j]) + lam * static_cast<acc_t>(f[j]));
        finite &= std::isfinite(static_cast<acc_t>(stored));
      }
      if (!finite) bad.store(g.index[ch.tensor], std::memory_order_relaxed);
    }
  });
  return bad.load();
}

template <typename scalar_t>
void merge_group(const Group& g, const std::vector<Chunk>& chunks, double lam_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t lam = static_cast<acc_t>(lam_d), keep = acc_t(1) - lam;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      scalar_t* m = g.merged[ch.tensor].data_ptr<scalar_t>();
      const scalar_t* f = g.fine_tuned[ch.tensor].const_data_ptr<scalar_t>();
      for (int64_t j = ch.begin; j < ch.end; ++j) {
        m[j] = static_cast<scalar_t>(keep * static_cast<acc_t>(m[j]) + lam * static_cast<acc_t>(f[j]));
      }
    }
  });
}

void scaled_merge_cpu(at::TensorList merged, at::TensorList fine_tuned, double lam, bool check_finite) {
  TORCH_CHECK_VALUE(merged.size() == fine_tuned.size(), "scaled_merge_: ", merged.size(), " merged tensors but ",
                    fine_tuned.size(), " fine-tuned ones");
  std::vector<Group> groups;  // one per dtype: adapters of one model usually share one
  for (size_t i = 0; i < merged.size(); ++i) {
    TORCH_CHECK_VALUE(merged[i].sizes() == fine_tuned[i].sizes() && merged[i].scalar_type() == fine_tuned[i].scalar_type(),
                      "scaled_merge_: tensor ", i, " is ", merged[i].sizes(), " ", merged[i].scalar_type(),
                      " but its fine-tuned counterpart is ", fine_tuned[i].sizes(), " ", fine_tuned[i].scalar_type());
    TORCH_CHECK_VALUE(merged[i].is_contiguous() && fine_tuned[i].is_contiguous(), "scaled_merge_: tensor ", i,
                      " is not contiguous");
    auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.dtype == merged[i].scalar_type(); });
    if (g == groups.end()) g = groups.insert(groups.end(), Group{merged[i].scalar_type(), {}, {}, {}});
    g->merged.push_back(merged[i]);
    g->fine_tuned.push_back(fine_tuned[i]);
    g->index.push_back(static_cast<int64_t>(i));
  }
  std::vector<std::vector<Chunk>> chunks;
  for (const Group& g : groups) chunks.push_back(chunks_of(g.merged));
  if (check_finite) {  // every check before any write
    for (size_t k = 0; k < groups.size(); ++k) {
      int64_t bad = -1;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, groups[k].dtype, "slao::scaled_merge_",
                                      [&] { bad = find_nonfinite<scalar_t>(groups[k], chunks[k], lam); });
      TORCH_CHECK_VALUE(bad < 0, "scaled_merge_: the merge would write non-finite values into tensor ", bad,
                        " (shape ", merged[std::max<int64_t>(bad, 0)].sizes(), "); nothing was written");
    }
  }
  for (size_t k = 0; k < groups.size(); ++k) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, groups[k].dtype, "slao::scaled_merge_",
                                    [&] { merge_group<scalar_t>(groups[k], chunks[k], lam); });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slao, CPU, m) { m.impl("scaled_merge_", &scaled_merge_cpu); }

}  // namespace slao
