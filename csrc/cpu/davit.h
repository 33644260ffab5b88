// DaViT attention on the CPU: window attention, channel-group attention, and the few
// helpers the DaViT model needs around them (LayerNorm, ConvPosEnc, MLP), all fp32,
// channels-last. Not here: stem/downsample convolutions and the head (the model runs
// those through PyTorch; they are <5 % of the work).
//
// Legend: B batch, H x W feature map, N = H*W tokens, C channels, h heads (= channel
// groups G), d = C/h head dim, ws window side, L = ws*ws tokens per window.
//
// Every projection goes through one GEMM tile routine (`GemmTile`) whose A rows and C rows
// are given as pointer tables: window partition, zero padding (rows that point at a zero
// vector) and crop (rows that are never listed) are index arithmetic, never copies.
// The tile routine has a scalar reference and AVX2 / AVX-512 versions picked at run time
// through dovetail::active_isa().
#pragma once
#include <cstdint>
#include <vector>

#include "common/dtype.h"  // fp32_to_bf16: nearest even, NaN kept quiet

namespace dovetail::davit {

// ---- GEMM tile (shared by every kernel) ------------------------------------------------
// c[i][j] = (res ? res[i][j] : 0) + (bias ? bias[j] : 0) + sum_k A(i,k) * B(k,j),
// then GELU (exact, erf) when `gelu`. A(i,k) = a[i][k * a_cs]. `res` may alias `c`.
// B is row-major (B(k,j) = b[k*ldb + j]) when b_panel == 0, else packed in panels of
// kPanel columns: B(k,j) = b[(j / kPanel) * b_panel + k * kPanel + j % kPanel]; a tile
// then starts at a column that is a multiple of kPanel.
constexpr int kPanel = 32;
struct GemmTile {
  int m = 0, n = 0, k = 0;
  const float* const* a = nullptr;
  long a_cs = 1;
  const float* b = nullptr;
  long ldb = 0;
  long b_panel = 0;
  float* const* c = nullptr;
  const float* const* res = nullptr;
  const float* bias = nullptr;
  bool gelu = false;
  // bf16 variant (gemm_tile_bf16): B as bf16 pairs in panels, B(k,j) =
  // b16[(j / kPanel) * b16_panel + (k / 2) * 2 * kPanel + (j % kPanel) * 2 + k % 2]; A is
  // rounded to bf16 (nearest even) by the kernel; products summed in fp32.
  const uint16_t* b16 = nullptr;
  long b16_panel = 0;
};

// In-place row softmax of s[r*ld + j], j < n, of exp(scale * (s - max)).
// Per-ISA function table; `kernels()` returns the one for the active ISA.
// layer_norm_row / cpe_row: see davit_rows.h (the same plain C++ built once per ISA).
struct Kernels {
  void (*gemm_tile)(const GemmTile&);
  void (*gemm_tile_bf16)(const GemmTile&);
  void (*softmax_rows)(float* s, int rows, int n, long ld, float scale);
  void (*layer_norm_row)(const float* x, int C, const float* g, const float* b, float eps, float* y);
  void (*cpe_row)(const float* img, int H, int W, int C, int yy, const float* wt, const float* bias,
                  float* out);
  // dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols.
  void (*transpose)(const float* src, long lds, int rows, int cols, float* dst, long ldd);
};
const Kernels& kernels();  // the active ISA's table
#define DOVETAIL_DAVIT_ISA_DECLS                                                                  \
  void gemm_tile(const GemmTile&);                                                                \
  void gemm_tile_bf16(const GemmTile&);                                                           \
  void softmax_rows(float*, int, int, long, float);                                               \
  void layer_norm_row(const float*, int, const float*, const float*, float, float*);              \
  void cpe_row(const float*, int, int, int, int, const float*, const float*, float*);          \
  void transpose(const float*, long, int, int, float*, long);
namespace scalar { DOVETAIL_DAVIT_ISA_DECLS }
namespace avx2 { DOVETAIL_DAVIT_ISA_DECLS }
namespace avx512 {
DOVETAIL_DAVIT_ISA_DECLS
void gemm_tile_dpbf16(const GemmTile&);  // gemm_tile_bf16 through vdpbf16ps (Isa::Avx512Bf16)
}
#undef DOVETAIL_DAVIT_ISA_DECLS

// Threads used by the DaViT drivers (default: OMP_NUM_THREADS, else all hardware threads).
int num_threads();
void set_num_threads(int n);  // ValueError unless 1 <= n <= 1024

// ---- packed linear layer -----------------------------------------------------------------
// PyTorch Linear weight [out, in] repacked once into panels of kPanel output channels:
// panel p holds W^T[:, p*kPanel : (p+1)*kPanel] as [in][kPanel] (zero-padded past `out`),
// so each GEMM k-step reads one contiguous 128-byte row of the panel.
// With `bf16`, the projections use a bf16 copy (wt16: the same panels with the input axis in
// pairs, see GemmTile::b16) and bf16 activations, summed in fp32; wt stays for fp32 uses.
struct PackedLinear {
  int in = 0, out = 0;
  std::vector<float> wt;    // [ceil(out / kPanel)][in][kPanel]
  long panel_stride() const { return (long)in * kPanel; }
  std::vector<float> bias;  // [out] (zeros when the layer has none)
  bool bf16 = false;
  std::vector<uint16_t> wt16;  // [ceil(out / kPanel)][ceil(in / 2)][kPanel][2]
  long panel_stride16() const { return (long)((in + 1) / 2) * 2 * kPanel; }
};
PackedLinear pack_linear(const float* weight, const float* bias, int out, int in, bool bf16 = false);

// y[r] = (res ? res[r] : 0) + x[r] W^T + b, optional GELU; rows of length in / out, contiguous.
void linear(const float* x, long rows, const PackedLinear& w, float* y, const float* res, bool gelu);

// ---- attention ---------------------------------------------------------------------------
// Window attention on z [B, H, W, C] (already normalised). Zero padding to multiples of ws
// *after* the norm, no mask: padded tokens take part as keys/values (their q/k/v are the qkv
// bias), padded queries are dropped. out [B, H, W, C] = (res ? res : 0) + attention output.
struct WindowAttentionParams {
  const float* x = nullptr;
  float* out = nullptr;
  const float* res = nullptr;  // may alias out
  int B = 0, H = 0, W = 0, C = 0, heads = 0, ws = 7;
  const PackedLinear* qkv = nullptr;   // [C -> 3C], output layout [q | k | v], heads of d
  const PackedLinear* proj = nullptr;  // [C -> C]
};
void window_attention(const WindowAttentionParams& p);

// Channel-group attention on x [B, N, C] (already normalised), the original code's roles:
// per group g, A_g = softmax_rows(d^-1/2 * K_g^T V_g) (d x d, reduced over all N in fp32),
// o_g = Q_g A_g^T, out = (res ? res : 0) + proj(o).
struct ChannelAttentionParams {
  const float* x = nullptr;
  float* out = nullptr;
  const float* res = nullptr;  // may alias out
  int B = 0, N = 0, C = 0, groups = 0;
  const PackedLinear* qkv = nullptr;
  const PackedLinear* proj = nullptr;
};
void channel_attention(const ChannelAttentionParams& p);

// ---- model helpers -----------------------------------------------------------------------
// LayerNorm over the last axis (C), rows independent. y may alias x.
void layer_norm(const float* x, long rows, int C, const float* gamma, const float* beta, float eps,
                float* y);
// ConvPosEnc: y = x + dwconv3x3(x) + bias on [B, H, W, C], zero padding 1. weight [C][3][3].
// y must not alias x.
void conv_pos_enc(const float* x, int B, int H, int W, int C, const float* weight, const float* bias,
                  float* y);
// y = x + fc2(GELU(fc1(LN(x)))) on rows of C; y may alias x.
void mlp_block(const float* x, long rows, int C, const float* gamma, const float* beta, float eps,
               const PackedLinear& fc1, const PackedLinear& fc2, float* y);

}  // namespace dovetail::davit
