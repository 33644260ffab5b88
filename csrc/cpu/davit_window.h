// Window partition of a channels-last [B, H, W, C] map as index arithmetic, shared by the
// CPU driver and the CUDA kernels (so the CPU tests cover the mapping the GPU uses).
// Tokens are numbered in padded window order: image b, window row wy, window column wx
// (row-major over the ceil(H/ws) x ceil(W/ws) grid), then row-major inside the window.
#pragma once

#include "common/hd.h"

namespace dovetail::davit {

struct WindowGrid {
  int H, W, ws, nwx, nW;  // nwx windows per row, nW windows per image
};

DT_HD WindowGrid make_window_grid(int H, int W, int ws) {
  const int nwy = (H + ws - 1) / ws, nwx = (W + ws - 1) / ws;
  return {H, W, ws, nwx, nwy * nwx};
}

// Token index (b*H + y)*W + x of padded-window-order token r, or -1 for a padding token.
DT_HD long window_token(const WindowGrid& g, long r) {
  const int L = g.ws * g.ws;
  const long w = r / L;
  const int t = (int)(r - w * L);
  const int b = (int)(w / g.nW), wi = (int)(w - (long)b * g.nW);
  const int y = (wi / g.nwx) * g.ws + t / g.ws, x = (wi % g.nwx) * g.ws + t % g.ws;
  if (y >= g.H || x >= g.W) return -1;
  return ((long)b * g.H + y) * g.W + x;
}

}  // namespace dovetail::davit
