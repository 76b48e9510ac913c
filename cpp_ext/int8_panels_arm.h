// The AArch64 integer cores of int8_panels.h (ARMv8.0 NEON; ARMv8.2 dot product): included by it, inside
// namespace edge_tune_int8, after the layout and the scalar cores they fall back on.
#pragma once

#ifdef ET_INT8_ARM
// ARMv8.0 NEON (Cortex-A53/A72: Raspberry Pi Zero 2, 3, 4): smull/smlal pair two byte products in int16,
// sadalp widens and adds neighbouring pairs into int32 lanes; a horizontal add at the end.
template <int R>
void tile_neon(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int ncols, int32_t* out) {
  if (ncols < 2) return tile_scalar<R>(x, ldx, w, ldw, k, ncols, out);
  int32x4_t acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const int8x16_t w0 = vld1q_s8(w + i), w1 = vld1q_s8(w + ldw + i);
    for (int r = 0; r < R; ++r) {
      const int8x16_t xr = vreinterpretq_s8_u8(vld1q_u8(x + r * ldx + i));
      acc[r][0] = vpadalq_s16(acc[r][0], vmlal_high_s8(vmull_s8(vget_low_s8(xr), vget_low_s8(w0)), xr, w0));
      acc[r][1] = vpadalq_s16(acc[r][1], vmlal_high_s8(vmull_s8(vget_low_s8(xr), vget_low_s8(w1)), xr, w1));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) out[r * 2 + c] = vaddvq_s32(acc[r][c]);
  tile_tail<R>(x, ldx, w, ldw, i, k, out);
}

// One 16-byte load holds 4 k of 4 columns. A row's 4 bytes, doubled to 8, multiply two columns' 4 k at a
// time (smull); two k-quads share one int16 sum before sadalp. Each int32 lane then holds half a column's
// sum (lanes: c k01, c k23, c+1 k01, c+1 k23), and addp folds them at the end. 16 columns take 32
// accumulators for 4 rows, more than the 32 registers hold with the weights, so the panel runs as two
// halves of 8 columns.
template <int R>
void panel_neon(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4, int64_t bcols, int32_t* out) {
  const int64_t quads = k4 / 4, stride = bcols * 4;
  for (int half = 0; half < 2; ++half) {
    const int8_t* ph = pw + half * 32;
    int32x4_t acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
    int64_t kb = 0;
    for (; kb + 2 <= quads; kb += 2) {
      const int8x16_t a0 = vld1q_s8(ph + kb * stride), a1 = vld1q_s8(ph + kb * stride + 16);
      const int8x16_t b0 = vld1q_s8(ph + (kb + 1) * stride), b1 = vld1q_s8(ph + (kb + 1) * stride + 16);
      for (int r = 0; r < R; ++r) {
        int32_t f0, f1;
        std::memcpy(&f0, x + r * ldx + kb * 4, 4);
        std::memcpy(&f1, x + r * ldx + kb * 4 + 4, 4);
        const int8x8_t x0 = vreinterpret_s8_s32(vdup_n_s32(f0)), x1 = vreinterpret_s8_s32(vdup_n_s32(f1));
        acc[r][0] = vpadalq_s16(acc[r][0], vmlal_s8(vmull_s8(vget_low_s8(a0), x0), vget_low_s8(b0), x1));
        acc[r][1] = vpadalq_s16(acc[r][1], vmlal_s8(vmull_s8(vget_high_s8(a0), x0), vget_high_s8(b0), x1));
        acc[r][2] = vpadalq_s16(acc[r][2], vmlal_s8(vmull_s8(vget_low_s8(a1), x0), vget_low_s8(b1), x1));
        acc[r][3] = vpadalq_s16(acc[r][3], vmlal_s8(vmull_s8(vget_high_s8(a1), x0), vget_high_s8(b1), x1));
      }
    }
    if (kb < quads) {
      const int8x16_t a0 = vld1q_s8(ph + kb * stride), a1 = vld1q_s8(ph + kb * stride + 16);
      for (int r = 0; r < R; ++r) {
        int32_t f0;
        std::memcpy(&f0, x + r * ldx + kb * 4, 4);
        const int8x8_t x0 = vreinterpret_s8_s32(vdup_n_s32(f0));
        acc[r][0] = vpadalq_s16(acc[r][0], vmull_s8(vget_low_s8(a0), x0));
        acc[r][1] = vpadalq_s16(acc[r][1], vmull_s8(vget_high_s8(a0), x0));
        acc[r][2] = vpadalq_s16(acc[r][2], vmull_s8(vget_low_s8(a1), x0));
        acc[r][3] = vpadalq_s16(acc[r][3], vmull_s8(vget_high_s8(a1), x0));
      }
    }
    for (int r = 0; r < R; ++r) {
      vst1q_s32(out + r * 16 + half * 8, vpaddq_s32(acc[r][0], acc[r][1]));
      vst1q_s32(out + r * 16 + half * 8 + 4, vpaddq_s32(acc[r][2], acc[r][3]));
    }
  }
}

// ARMv8.2 dot product (Cortex-A55/A76 and later: Raspberry Pi 5, Jetson Orin, recent phones): sdot adds
// 4 byte products into each int32 lane, so one instruction per 4 columns and k-quad, no widening steps.
template <int R>
ET_DOTPROD void tile_dotprod(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int ncols,
                             int32_t* out) {
  if (ncols < 2) return tile_scalar<R>(x, ldx, w, ldw, k, ncols, out);
  int32x4_t acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const int8x16_t w0 = vld1q_s8(w + i), w1 = vld1q_s8(w + ldw + i);
    for (int r = 0; r < R; ++r) {
      const int8x16_t xr = vreinterpretq_s8_u8(vld1q_u8(x + r * ldx + i));
      acc[r][0] = vdotq_s32(acc[r][0], xr, w0);
      acc[r][1] = vdotq_s32(acc[r][1], xr, w1);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) out[r * 2 + c] = vaddvq_s32(acc[r][c]);
  tile_tail<R>(x, ldx, w, ldw, i, k, out);
}

// One k-quad Q of the 4 held in xv: the 16 columns' 4 registers against lane Q (4 bytes) of each row.
template <int R, int Q>
ET_DOTPROD inline void dot_quad(int32x4_t (&acc)[R][4], const int8_t* p, const int8x16_t (&xv)[R]) {
  const int8x16_t w0 = vld1q_s8(p), w1 = vld1q_s8(p + 16), w2 = vld1q_s8(p + 32), w3 = vld1q_s8(p + 48);
  for (int r = 0; r < R; ++r) {
    acc[r][0] = vdotq_laneq_s32(acc[r][0], w0, xv[r], Q);
    acc[r][1] = vdotq_laneq_s32(acc[r][1], w1, xv[r], Q);
    acc[r][2] = vdotq_laneq_s32(acc[r][2], w2, xv[r], Q);
    acc[r][3] = vdotq_laneq_s32(acc[r][3], w3, xv[r], Q);
  }
}

// 16 accumulators for 4 rows x 16 columns; a row's 16 bytes of x (4 k-quads) are loaded once and each quad
// taken by lane.
template <int R>
ET_DOTPROD void panel_dotprod(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4, int64_t bcols,
                              int32_t* out) {
  const int64_t quads = k4 / 4, stride = bcols * 4;
  int32x4_t acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
  int64_t kb = 0;
  for (; kb + 4 <= quads; kb += 4) {
    int8x16_t xv[R];
    for (int r = 0; r < R; ++r) xv[r] = vreinterpretq_s8_u8(vld1q_u8(x + r * ldx + kb * 4));
    dot_quad<R, 0>(acc, pw + kb * stride, xv);
    dot_quad<R, 1>(acc, pw + (kb + 1) * stride, xv);
    dot_quad<R, 2>(acc, pw + (kb + 2) * stride, xv);
    dot_quad<R, 3>(acc, pw + (kb + 3) * stride, xv);
  }
  for (; kb < quads; ++kb) {
    int8x16_t xv[R];
    for (int r = 0; r < R; ++r) {
      int32_t f0;
      std::memcpy(&f0, x + r * ldx + kb * 4, 4);
      xv[r] = vreinterpretq_s8_s32(vdupq_n_s32(f0));
    }
    dot_quad<R, 0>(acc, pw + kb * stride, xv);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) vst1q_s32(out + r * 16 + 4 * j, acc[r][j]);
}

inline void row_sums_neon(const int8_t* w, int64_t rows, int64_t k, int32_t* out) {
  for (int64_t o = 0; o < rows; ++o) {
    const int8_t* r = w + o * k;
    int32x4_t acc = vdupq_n_s32(0);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) acc = vpadalq_s16(acc, vpaddlq_s8(vld1q_s8(r + i)));
    int32_t t = vaddvq_s32(acc);
    for (; i < k; ++i) t += r[i];
    out[o] = t;
  }
}
#endif  // ET_INT8_ARM
