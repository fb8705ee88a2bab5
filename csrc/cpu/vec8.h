// Eight-lane float I/O for the streaming loops: every storage type is widened to a
// Vectorized<float> of 8 lanes, so that one step covers exactly one byte of the relu mask.
// float64 (kept for gradcheck) takes the scalar paths instead.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace se_kernels::cpu {

using Vec = at::vec::Vectorized<float>;
static_assert(Vec::size() == 8, "se_kernels CPU kernels step 8 float lanes (one relu-mask byte)");

template <typename T>
inline constexpr bool kVectorized =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

template <typename T>
inline Vec load8(const T* p);

template <>
inline Vec load8(const float* p) {
  return Vec::loadu(p);
}

template <>
inline Vec load8(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}

template <>
inline Vec load8(const c10::Half* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}

template <typename T>
inline void store8(T* p, const Vec& v);

template <>
inline void store8(float* p, const Vec& v) {
  v.store(p);
}

template <>
inline void store8(c10::BFloat16* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
#else
  at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, 8);
#endif
}

template <>
inline void store8(c10::Half* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
#else
  at::vec::convert_from_float<c10::Half>(v, v).store(p, 8);
#endif
}

// load8 / store8 of the first `count` elements at p (count <= 8; the other lanes load as 0),
// through an 8-element buffer, so that a partial vector gets exactly a full vector's arithmetic.
template <typename T>
inline Vec load8n(const T* p, int64_t count) {
  if (count == 8) return load8(p);
  T t[8] = {};
  std::copy(p, p + count, t);
  return load8(t);
}

template <typename T>
inline void store8n(T* p, const Vec& v, int64_t count) {
  if (count == 8) return store8(p, v);
  T t[8];
  store8(t, v);
  std::copy(t, t + count, p);
}

// store8 with a non-temporal (streaming) store where the ISA has one: the line goes to memory
// without being read first (no read-for-ownership) and without filling the cache. p must be
// aligned to 8 elements. Callers end a run of these with stream_fence().
template <typename T>
inline void stream8(T* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, __m256(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
  } else {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
  }
#else
  store8(p, v);
#endif
}

// The output step of the flat walks: a full vector (count == 8) streamed when kStream, else
// store8n (a partial vector never streams: it is not aligned).
template <bool kStream, typename T>
inline void put8n(T* p, const Vec& v, int64_t count) {
  if (kStream && count == 8)
    stream8(p, v);
  else
    store8n(p, v, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Bit j set <=> lane j > 0 (NaN: clear). This is the relu mask: relu(v) > 0 <=> v > 0.
inline uint8_t positive_bits(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(__m256(v), _mm256_setzero_ps(), _CMP_GT_OQ)));
#else
  float t[8];
  v.store(t);
  uint8_t bits = 0;
  for (int j = 0; j < 8; ++j) bits |= static_cast<uint8_t>(t[j] > 0.f) << j;
  return bits;
#endif
}

// Lanes whose bit is clear become +0 (bitwise, so inf and NaN there become 0 too, as in
// relu's backward).
inline Vec keep_lanes(const Vec& v, uint8_t bits) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), select), select);
  return Vec(_mm256_and_ps(__m256(v), _mm256_castsi256_ps(set)));
#else
  float t[8];
  v.store(t);
  for (int j = 0; j < 8; ++j)
    if (!((bits >> j) & 1)) t[j] = 0.f;
  return Vec::loadu(t);
#endif
}

inline bool mask_bit(const uint8_t* row, int64_t i) {
  return (row[i >> 3] >> (i & 7)) & 1;
}

// Sum of the 8 lanes, in the order of sum_lanes8 below: ((0+1)+(2+3)) + ((4+5)+(6+7)).
inline float lane_sum(const Vec& v) {
  float t[8];
  v.store(t);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// Lane j of the result = lane_sum(v[j]), bit for bit.
inline Vec sum_lanes8(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 t0 = _mm256_hadd_ps(__m256(v[0]), __m256(v[1]));
  const __m256 t1 = _mm256_hadd_ps(__m256(v[2]), __m256(v[3]));
  const __m256 t2 = _mm256_hadd_ps(__m256(v[4]), __m256(v[5]));
  const __m256 t3 = _mm256_hadd_ps(__m256(v[6]), __m256(v[7]));
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // rows 0-3: (0+1)+(2+3) | (4+5)+(6+7)
  const __m256 u1 = _mm256_hadd_ps(t2, t3);  // rows 4-7
  return Vec(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  float t[8];
  for (int j = 0; j < 8; ++j) t[j] = lane_sum(v[j]);
  return Vec::loadu(t);
#endif
}

}  // namespace se_kernels::cpu
