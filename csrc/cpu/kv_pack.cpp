// KV block pack / unpack: copy a request's KV slots out of one instance's cache into a dense
// tensor and back (KV migration between instances).
//
// Same contract as loong/kv/pack.py (kv_pack_torch, kv_unpack_torch_):
//   kv     [L, 2, num_blocks, block_size, H, D], contiguous CPU, float32 / bfloat16 / float16
//   slots  [n] int64 contiguous CPU; slot = block_id * block_size + offset, any order, n may be 0
//   kv_pack(kv, slots) -> packed [L, 2, n, H, D] (contiguous, kv's dtype),
//       packed[l, s, i] = kv[l, s].view(-1, H, D)[slots[i]]
//   kv_unpack_(kv, slots, packed) -> None, the inverse, writing kv in place. Slots must be
//       distinct; with a repeated slot which row lands is unspecified (threads race).
// Bad shapes / dtypes raise ValueError (TORCH_CHECK_VALUE), a slot outside
// [0, num_blocks * block_size) IndexError (TORCH_CHECK_INDEX) naming it; every slot is checked
// before anything is copied, so a rejected unpack writes nothing.
//
// The work is one memcpy of H * D * element_size bytes per (layer, k/v, row), dtype-generic by
// element size. The L * 2 * n copies are spread over OpenMP threads (at::get_num_threads() of
// them) only when more than kParallelMinBytes move: a fork/join costs more than a small copy.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace loong {
namespace {

constexpr int64_t kParallelMinBytes = int64_t(1) << 18;   // 256 KiB

struct PackGeom {
  int64_t L, total, n, row_bytes;
};

PackGeom check_pack(const at::Tensor& kv, const at::Tensor& slots, const char* name) {
  TORCH_CHECK_VALUE(kv.dim() == 6 && kv.size(1) == 2, name,
                    ": kv must be [num_layers, 2, num_blocks, block_size, num_kv_heads, "
                    "head_dim], got shape ",
                    kv.sizes());
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong,
                    name, ": slots must be a 1-D int64 tensor, got shape ", slots.sizes(),
                    " dtype ", slots.scalar_type());
  const auto st = kv.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
              ": kv must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(kv.device().is_cpu() && slots.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(kv.is_contiguous() && slots.is_contiguous(), name,
              ": kv and slots must be contiguous");
  PackGeom g;
  g.L = kv.size(0);
  g.total = kv.size(2) * kv.size(3);
  g.n = slots.size(0);
  g.row_bytes = kv.size(4) * kv.size(5) * static_cast<int64_t>(kv.element_size());
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < g.n; ++i) {
    TORCH_CHECK_INDEX(sp[i] >= 0 && sp[i] < g.total, name, ": slot ", sp[i],
                      " out of range [0, ", g.total, ") (num_blocks ", kv.size(2),
                      " x block_size ", kv.size(3), ")");
  }
  return g;
}

// For every (layer, k/v, row) r of the L * 2 * n rows: PACK copies cache row
// (lk, slots[i]) to packed row r, else the reverse.
template <bool PACK>
void copy_rows(char* cache, char* packed, const int64_t* slots, const PackGeom& g) {
  const int64_t n = g.n, rows = g.L * 2 * n, rb = g.row_bytes, total = g.total;
  if (rows == 0 || rb == 0) return;
  const bool par = rows > 1 && rows * rb > kParallelMinBytes && !at::in_parallel_region() &&
                   at::get_num_threads() > 1;
  const int nthr = par ? at::get_num_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(nthr) if (par)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t lk = r / n, i = r - lk * n;
    char* c = cache + (lk * total + slots[i]) * rb;
    char* p = packed + r * rb;
    if (PACK)
      std::memcpy(p, c, static_cast<size_t>(rb));
    else
      std::memcpy(c, p, static_cast<size_t>(rb));
  }
}

}  // namespace

at::Tensor kv_pack(const at::Tensor& kv, const at::Tensor& slots) {
  const PackGeom g = check_pack(kv, slots, "kv_pack");
  at::Tensor packed = at::empty({g.L, 2, g.n, kv.size(4), kv.size(5)}, kv.options());
  copy_rows<true>(static_cast<char*>(kv.data_ptr()), static_cast<char*>(packed.data_ptr()),
                  slots.data_ptr<int64_t>(), g);
  return packed;
}

void kv_unpack_(at::Tensor kv, const at::Tensor& slots, const at::Tensor& packed) {
  // Shapes first (ValueError), then the slot range (IndexError), as the torch fallback does.
  TORCH_CHECK_VALUE(kv.dim() == 6 && slots.dim() == 1, "kv_unpack_: kv must be 6-D and slots "
                    "1-D, got kv ", kv.sizes(), " slots ", slots.sizes());
  const std::vector<int64_t> want = {kv.size(0), 2, slots.size(0), kv.size(4), kv.size(5)};
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef(want),
                    "kv_unpack_: packed must have shape [L, 2, n, H, D] = ", at::IntArrayRef(want),
                    " for kv ", kv.sizes(), " and ", slots.size(0), " slots, got ",
                    packed.sizes());
  TORCH_CHECK_VALUE(packed.scalar_type() == kv.scalar_type(), "kv_unpack_: packed dtype ",
                    packed.scalar_type(), " must equal kv dtype ", kv.scalar_type());
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous(),
              "kv_unpack_: packed must be a contiguous CPU tensor");
  const PackGeom g = check_pack(kv, slots, "kv_unpack_");
  copy_rows<false>(static_cast<char*>(kv.data_ptr()), static_cast<char*>(packed.data_ptr()),
                   slots.data_ptr<int64_t>(), g);
}

}  // namespace loong
