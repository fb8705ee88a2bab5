// The streamed plan of the CUDA backend: one persistent kernel that reads x (backward: dy and x)
// from HBM once on batches too large for the L2, as __host__ __device__ functions so that a
// host-compiled test (tests/cpp/stream_host.cpp, driven by tests/test_cuda_stream.py) can run the
// schedule with threads standing in for blocks.
//
// The split plan runs four kernels over the whole batch: pool (channel sums), the two MLP GEMMs,
// then the element-wise pass (scale / grad_input), which re-reads x. When the batch's bytes exceed
// the L2, that re-read comes from HBM: a forward moves 3 tensors' bytes instead of 2.
//
// The streamed plan cuts the batch into groups of `group` samples and runs the same four stages
// per group, as work items of one kernel:
//   stage 0 (pool):   the channel-sum blocks of the group's samples
//   stage 1 (first):  the first GEMM's blocks (forward: hidden; backward: dz1) for the group
//   stage 2 (second): the second GEMM's blocks (forward: logits and gates; backward: dp)
//   stage 3 (apply):  the element-wise blocks of the group's tiles (its last tile first)
// An item of stage k > 0 of group g needs every item of stage k - 1 of group g done: a counter per
// (group, stage) that finished items increment (release) and the waiting block reads (acquire).
//
// Order: items are numbered in rounds. Round r holds stage k's items of group r - lag[k] (none
// where that group does not exist), stages in order; every round has the same size. Blocks claim
// item numbers from one atomic counter, in increasing order. lag is non-decreasing, so every item
// an item waits for has a smaller number: it was claimed before, by a block that is running, and
// (by induction on the number) it finishes. No block waits for one that is not resident, whatever
// the GPU runs beside this kernel: the plan needs no cooperative launch.
//
// Reuse: a block that claims a number past the items counts itself out on the exit counter; the
// last block out (it sees blocks - 1 there) checks the claim counter (final_claims) and sets every
// counter back to zero. The next launch on the same stream therefore finds them zero, and one
// buffer per (device, stream) serves every launch there (se_cuda.cu stream_counters) without a
// fill before each. Every other block has stopped touching the counters by then: its exit add
// follows its last claim, wait and signal.
//
// L2 reuse: group g's x is read in round g and re-read in round g + lag[3]; in between the GPU
// reads lag[3] more groups' x. The group and lag[3] are sized so that (lag[3] + 1) groups' kept
// bytes fit the L2 budget (the largest lag that does: the longest time for a group's chain of
// stages to finish before its re-read is due); the first lags spread the waits over the rounds in
// between.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SE_STREAM_HD __host__ __device__ __forceinline__
#else
#define SE_STREAM_HD inline
#endif

namespace se_kernels::stream {

constexpr int kStages = 4;
constexpr int kPool = 0, kFirst = 1, kSecond = 2, kApply = 3, kNone = -1;
constexpr int64_t kMaxGroup = 8;  // the MLP blocks hold 8 samples (one per warp)
constexpr int64_t kMinLag = 3;    // lag[3] >= 3: one round between the stages

struct Schedule {
  int64_t N;             // samples
  int64_t group;         // samples per group (1..kMaxGroup)
  int64_t groups;        // ceil(N / group)
  int64_t per[kStages];  // items of each stage per group (a partial last group has as many; the extra ones skip)
  int64_t lag[kStages];  // round of stage k's items of group g: g + lag[k]; lag[0] == 0, non-decreasing

  SE_STREAM_HD int64_t round_items() const { return per[0] + per[1] + per[2] + per[3]; }
  SE_STREAM_HD int64_t rounds() const { return groups + lag[kApply]; }
  SE_STREAM_HD int64_t items() const { return rounds() * round_items(); }
  // Counters: one per (group, stage) for the stages others wait on (0..2), the claim counter, then
  // the exit counter (se_cuda.cu stream_finish).
  SE_STREAM_HD int64_t counters() const { return groups * (kStages - 1) + 2; }
  SE_STREAM_HD int64_t counter(int64_t g, int stage) const { return g * (kStages - 1) + stage; }
  SE_STREAM_HD int64_t claim_counter() const { return groups * (kStages - 1); }
  SE_STREAM_HD int64_t exit_counter() const { return groups * (kStages - 1) + 1; }
  // What the claim counter holds once `blocks` blocks have all finished: each claimed the items
  // below items() once and then exactly one number past them (the one that stopped it).
  SE_STREAM_HD int64_t final_claims(int64_t blocks) const { return items() + blocks; }
};

struct Item {
  int stage;      // kPool..kApply, or kNone (a slot of a group that does not exist)
  int64_t group;  // its group
  int64_t index;  // its number among the stage's items of the group (0..per[stage])
};

SE_STREAM_HD Item item_of(const Schedule& s, int64_t i) {
  const int64_t size = s.round_items();
  const int64_t round = i / size;
  int64_t j = i - round * size;
  Item it{kNone, 0, 0};
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kStages; ++k) {  // unrolled: constant indices keep the schedule in registers
    if (j >= 0 && j < s.per[k]) {
      const int64_t g = round - s.lag[k];
      if (g >= 0 && g < s.groups) it = Item{k, g, j};
    }
    j -= s.per[k];
  }
  return it;
}

// The items of stage k's group an item of stage k + 1 waits for (k = 0..2; constant indices).
SE_STREAM_HD int64_t stage_items(const Schedule& s, int stage) {
  return stage == kPool ? s.per[kPool] : stage == kFirst ? s.per[kFirst] : stage == kSecond ? s.per[kSecond]
                                                                                              : s.per[kApply];
}

// Samples [first, end) of group g.
SE_STREAM_HD int64_t group_first(const Schedule& s, int64_t g) { return g * s.group; }
SE_STREAM_HD int64_t group_end(const Schedule& s, int64_t g) {
  return (g + 1) * s.group < s.N ? (g + 1) * s.group : s.N;
}

// What the plan is sized from: the bytes per sample it keeps in L2 between the first read and the
// re-read (x, backward dy, and the relu mask; the kernels read everything else once and write the
// outputs with evict-first hints), the L2 bytes it may count on keeping, and each stage's items
// per sample (pool, apply) or per group (the GEMMs).
struct StreamShape {
  int64_t N;
  int64_t kept_bytes;
  int64_t l2_budget;
  int64_t pool_per_sample;   // channel-sum blocks of one sample
  int64_t first_per_group;   // blocks of 32 outputs of the first GEMM
  int64_t second_per_group;  // blocks of 32 outputs of the second GEMM
  int64_t apply_tiles_per_sample;
  int64_t tiles_per_block;   // warps per block: tiles one apply item takes
  // pool units (pool_per_sample of them a sample) one pool item takes: 1 (a channel-sum block), or
  // the warps per block (flat tiles, se_tiles.h: a warp per tile, numbered as the apply items'); 0: 1
  int64_t pool_tiles_per_block;
};

// The schedule for `shape`, or false where the streamed plan does not apply: fewer than two groups,
// or kMinLag + 1 single-sample groups do not fit (the re-read would miss anyway). (Whether the
// split plan's re-read hits L2 already is the caller's question: se_cuda.cu asks it first.)
SE_STREAM_HD bool make_schedule(const StreamShape& shape, Schedule* out) {
  if (shape.N < 2 || shape.kept_bytes <= 0) return false;
  const int64_t fit = shape.l2_budget / shape.kept_bytes;  // samples the budget holds
  if (fit < kMinLag + 1) return false;
  // The largest group (up to 8) that leaves room for 2 * kMinLag + 2 groups, else kMinLag + 1.
  int64_t group = fit / (2 * kMinLag + 2);
  if (group < 1) group = 1;
  if (group > kMaxGroup) group = kMaxGroup;
  Schedule s{};
  s.N = shape.N;
  s.group = group;
  s.groups = (shape.N + group - 1) / group;
  if (s.groups < 2) return false;
  // (lag + 1) groups fit; past the last group a lag only adds empty rounds
  const int64_t lag = fit / group - 1 < s.groups ? fit / group - 1 : s.groups;
  const int64_t pool_block = shape.pool_tiles_per_block > 0 ? shape.pool_tiles_per_block : 1;
  s.per[kPool] = (group * shape.pool_per_sample + pool_block - 1) / pool_block;
  s.per[kFirst] = shape.first_per_group;
  s.per[kSecond] = shape.second_per_group;
  s.per[kApply] = (group * shape.apply_tiles_per_sample + shape.tiles_per_block - 1) / shape.tiles_per_block;
  s.lag[kPool] = 0;
  s.lag[kFirst] = lag / 3 > 1 ? lag / 3 : 1;
  s.lag[kSecond] = 2 * lag / 3 > s.lag[kFirst] ? 2 * lag / 3 : s.lag[kFirst];
  s.lag[kApply] = lag;
  *out = s;
  return true;
}

// The element-wise tiles of item `index` of group g's apply stage: tile numbers (in the whole
// batch's row-major numbering, se_tiles.h) first_tile(...) - k for k = index * tiles_per_block + warp,
// valid while k < the group's tile count: the group's last tile first.
SE_STREAM_HD int64_t apply_tile(const Schedule& s, int64_t g, int64_t index, int warp, int64_t tiles_per_sample,
                                int tiles_per_block) {
  const int64_t k = index * tiles_per_block + warp;
  const int64_t count = (group_end(s, g) - group_first(s, g)) * tiles_per_sample;
  return k < count ? group_first(s, g) * tiles_per_sample + count - 1 - k : -1;
}

// The flat channel-sum tile of warp `warp` of item `index` of group g's pool stage (flat tiles:
// pool_tiles_per_block == tiles_per_block), in the group's order, first tile first; -1 past the
// group's tiles.
SE_STREAM_HD int64_t pool_tile(const Schedule& s, int64_t g, int64_t index, int warp, int64_t tiles_per_sample,
                               int tiles_per_block) {
  const int64_t k = index * tiles_per_block + warp;
  const int64_t count = (group_end(s, g) - group_first(s, g)) * tiles_per_sample;
  return k < count ? group_first(s, g) * tiles_per_sample + k : -1;
}

}  // namespace se_kernels::stream
