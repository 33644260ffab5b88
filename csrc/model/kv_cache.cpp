#include "model/kv_cache.h"

#include <cstring>

#include "common/error.h"

namespace dovetail {

KvCache::KvCache(int64_t layers, int64_t kv_heads, int64_t slots, int64_t head_dim, KvType type)
    : layers_(layers), kv_heads_(kv_heads), slots_(slots), head_dim_(head_dim), type_(type) {
  elem_ = type == KvType::F32 ? 4 : 2;
  row_bytes_ = head_dim * elem_;
  layer_bytes_ = kv_heads * slots * row_bytes_;
  data_k_.resize((size_t)(layers * layer_bytes_));
  data_v_.resize((size_t)(layers * layer_bytes_));
}

void KvCache::store(int64_t layer, int64_t first, const float* k, const float* v, int64_t T) {
  const int64_t Dh = head_dim_, ld = kv_heads_ * Dh;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < kv_heads_; ++h) {
      const float* ks = k + t * ld + h * Dh;
      const float* vs = v + t * ld + h * Dh;
      uint8_t* kd = slot_ptr(data_k_, layer, h, first + t);
      uint8_t* vd = slot_ptr(data_v_, layer, h, first + t);
      if (type_ == KvType::F32) {
        std::memcpy(kd, ks, row_bytes_);
        std::memcpy(vd, vs, row_bytes_);
      } else {
        auto* kb = reinterpret_cast<uint16_t*>(kd);
        auto* vb = reinterpret_cast<uint16_t*>(vd);
        for (int64_t i = 0; i < Dh; ++i) {
          kb[i] = fp32_to_bf16(ks[i]);
          vb[i] = fp32_to_bf16(vs[i]);
        }
      }
    }
  }
}

void KvCache::compact(int64_t base, const int64_t* kept, int64_t n) {
  for (int64_t l = 0; l < layers_; ++l)
    for (int64_t h = 0; h < kv_heads_; ++h)
      for (int64_t i = 0; i < n; ++i) {
        if (kept[i] == i) continue;
        std::memcpy(slot_ptr(data_k_, l, h, base + i), slot_ptr(data_k_, l, h, base + kept[i]), row_bytes_);
        std::memcpy(slot_ptr(data_v_, l, h, base + i), slot_ptr(data_v_, l, h, base + kept[i]), row_bytes_);
      }
}

void KvCache::read(int64_t layer, int64_t n, float* k_out, float* v_out) const {
  DT_CHECK(layer >= 0 && layer < layers_, "layer " + std::to_string(layer) + " out of range");
  DT_CHECK(n >= 0 && n <= slots_, "slot count out of range");
  auto* self = const_cast<KvCache*>(this);
  for (int64_t h = 0; h < kv_heads_; ++h)
    for (int64_t s = 0; s < n; ++s) {
      const uint8_t* kp = self->slot_ptr(self->data_k_, layer, h, s);
      const uint8_t* vp = self->slot_ptr(self->data_v_, layer, h, s);
      float* ko = k_out + (h * n + s) * head_dim_;
      float* vo = v_out + (h * n + s) * head_dim_;
      for (int64_t i = 0; i < head_dim_; ++i) {
        if (type_ == KvType::F32) {
          ko[i] = reinterpret_cast<const float*>(kp)[i];
          vo[i] = reinterpret_cast<const float*>(vp)[i];
        } else {
          ko[i] = bf16_to_fp32(reinterpret_cast<const uint16_t*>(kp)[i]);
          vo[i] = bf16_to_fp32(reinterpret_cast<const uint16_t*>(vp)[i]);
        }
      }
    }
}

}  // namespace dovetail
