// KV cache of one model in fp32 or bf16, preallocated: values [layer][kv_head][slot][Dh],
// keys [layer][kv_head][slot / kKTile][Dh][kKTile] (the layout AttentionArgs takes); the
// slot count is rounded up to a multiple of kKTile.
//
// Slots [0, n_past) hold committed tokens. A forward over T tokens writes its keys and
// values to the scratch slots n_past .. n_past+T-1; commit(kept) then moves the kept rows
// right after the prefix (in order) and drops the rest.
#pragma once
#include <cstdint>

#include "common/buffer.h"
#include "cpu/ops.h"

namespace dovetail {

class KvCache {
 public:
  KvCache() = default;
  KvCache(int64_t layers, int64_t kv_heads, int64_t slots, int64_t head_dim, KvType type);

  // Write rows k, v [T, KV*Dh] (fp32) of `layer` to slots first .. first+T-1.
  void store(int64_t layer, int64_t first, const float* k, const float* v, int64_t T);
  // Move slots base + kept[i] to base + i for every layer and head; kept strictly increasing.
  void compact(int64_t base, const int64_t* kept, int64_t n);
  // Copy slots [0, n) of `layer` out as fp32 [KV, n, Dh] (tests and debugging).
  void read(int64_t layer, int64_t n, float* k_out, float* v_out) const;

  const void* k(int64_t layer) const { return data_k_.data() + layer * layer_bytes_; }
  const void* v(int64_t layer) const { return data_v_.data() + layer * layer_bytes_; }
  int64_t slots() const { return slots_; }
  KvType type() const { return type_; }
  size_t bytes() const { return data_k_.size() + data_v_.size(); }

 private:
  uint8_t* v_row(int64_t layer, int64_t head, int64_t slot) {
    return data_v_.data() + layer * layer_bytes_ + (head * slots_ + slot) * row_bytes_;
  }
  // Start of (layer, head) in the key tiles; feature d of slot s sits at k_offset(s, d, Dh).
  uint8_t* k_head(int64_t layer, int64_t head) {
    return data_k_.data() + layer * layer_bytes_ + head * slots_ * row_bytes_;
  }
  int64_t layers_ = 0, kv_heads_ = 0, slots_ = 0, head_dim_ = 0;
  KvType type_ = KvType::F32;
  int64_t elem_ = 4, row_bytes_ = 0, layer_bytes_ = 0;
  Buffer<uint8_t> data_k_, data_v_;
};

}  // namespace dovetail
