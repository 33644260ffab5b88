#include "model/kv_cache.h"

#include <cstring>

#include "common/error.h"

namespace dovetail {

namespace {

template <typename T>
T* as(uint8_t* p) { return reinterpret_cast<T*>(p); }

}  // namespace

KvCache::KvCache(int64_t layers, int64_t kv_heads, int64_t slots, int64_t head_dim, KvType type)
    : layers_(layers), kv_heads_(kv_heads), slots_(attention_stride(slots)), head_dim_(head_dim), type_(type) {
  elem_ = type == KvType::F32 ? 4 : 2;
  row_bytes_ = head_dim * elem_;
  layer_bytes_ = kv_heads * slots_ * row_bytes_;
  data_k_.resize((size_t)(layers * layer_bytes_));
  data_v_.resize((size_t)(layers * layer_bytes_));
}

void KvCache::store(int64_t layer, int64_t first, const float* k, const float* v, int64_t T) {
  const int64_t Dh = head_dim_, ld = kv_heads_ * Dh;
  for (int64_t h = 0; h < kv_heads_; ++h) {
    uint8_t* kh = k_head(layer, h);
    for (int64_t t = 0; t < T; ++t) {
      const float* ks = k + t * ld + h * Dh;
      const float* vs = v + t * ld + h * Dh;
      const int64_t s = first + t, k0 = k_offset(s, 0, Dh);
      if (type_ == KvType::F32) {
        for (int64_t i = 0; i < Dh; ++i) as<float>(kh)[k0 + i * kKTile] = ks[i];
        std::memcpy(v_row(layer, h, s), vs, row_bytes_);
      } else {
        auto* vb = as<uint16_t>(v_row(layer, h, s));
        for (int64_t i = 0; i < Dh; ++i) {
          as<uint16_t>(kh)[k0 + i * kKTile] = fp32_to_bf16(ks[i]);
          vb[i] = fp32_to_bf16(vs[i]);
        }
      }
    }
  }
}

void KvCache::compact(int64_t base, const int64_t* kept, int64_t n) {
  const int64_t Dh = head_dim_;
  // A key's features sit kKTile elements apart in its tile.
  auto move_key = [Dh](auto* kh, int64_t to, int64_t from) {
    for (int64_t d = 0; d < Dh; ++d) kh[to + d * kKTile] = kh[from + d * kKTile];
  };
  for (int64_t l = 0; l < layers_; ++l)
    for (int64_t h = 0; h < kv_heads_; ++h) {
      uint8_t* kh = k_head(l, h);
      for (int64_t i = 0; i < n; ++i) {
        if (kept[i] == i) continue;
        const int64_t to = k_offset(base + i, 0, Dh), from = k_offset(base + kept[i], 0, Dh);
        if (type_ == KvType::F32)
          move_key(as<float>(kh), to, from);
        else
          move_key(as<uint16_t>(kh), to, from);
        std::memcpy(v_row(l, h, base + i), v_row(l, h, base + kept[i]), row_bytes_);
      }
    }
}

void KvCache::read(int64_t layer, int64_t n, float* k_out, float* v_out) const {
  DT_CHECK(layer >= 0 && layer < layers_, "layer " + std::to_string(layer) + " out of range");
  DT_CHECK(n >= 0 && n <= slots_, "slot count out of range");
  auto* self = const_cast<KvCache*>(this);
  const int64_t Dh = head_dim_;
  auto load = [&](uint8_t* p, int64_t i) {
    return type_ == KvType::F32 ? as<float>(p)[i] : bf16_to_fp32(as<uint16_t>(p)[i]);
  };
  for (int64_t h = 0; h < kv_heads_; ++h) {
    uint8_t* kh = self->k_head(layer, h);
    for (int64_t s = 0; s < n; ++s) {
      uint8_t* vp = self->v_row(layer, h, s);
      float* ko = k_out + (h * n + s) * Dh;
      float* vo = v_out + (h * n + s) * Dh;
      for (int64_t i = 0; i < Dh; ++i) {
        ko[i] = load(kh, k_offset(s, i, Dh));
        vo[i] = load(vp, i);
      }
    }
  }
}

}  // namespace dovetail
