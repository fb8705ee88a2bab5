// Host build of csrc/cuda/se_stream.h for tests/test_cuda_stream.py: the streamed plan's schedule,
// run with threads standing in for the persistent kernel's blocks. Each thread does what a block of
// streamed_forward_kernel / streamed_backward_kernel does (csrc/cuda/se_cuda.cu: run_streamed):
// claim the next item number from one counter, wait (acquire) until the item's previous stage of
// its group has signalled every item, do the item, signal (release); past the items, count out on
// the exit counter, the last one out zeroing the counters (stream_finish), which two launches on
// the same counters check. The items' work is stood in for by plain (non-atomic) writes of values
// that depend on what the item reads from the previous stage, so a missing wait or a wrong count
// gives a wrong value, and ThreadSanitizer (the SE_STREAM_MAIN build) reports a read that is not
// ordered after the write it needs.
//
// Loaded with ctypes (any C++17 compiler, no CUDA toolkit), or built with -DSE_STREAM_MAIN as a
// program that runs a fixed set of shapes.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "../../csrc/cuda/se_stream.h"

using namespace se_kernels::stream;

namespace {

int fail(char* msg, int len, const char* what, int64_t a, int64_t b, int64_t c) {
  std::snprintf(msg, len, "%s (%lld, %lld, %lld)", what, static_cast<long long>(a), static_cast<long long>(b),
                static_cast<long long>(c));
  return 1;
}

// The value item (stage, group, index) writes, given the sum of what it read from the previous
// stage's items of its group (0 for the pool stage).
int64_t value(int stage, int64_t g, int64_t index, int64_t read) {
  return read * 3 + 1000003 * stage + 7919 * g + index + 1;
}

StreamShape shape_of(const int64_t* v) {
  return StreamShape{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]};
}

// Static checks of the numbering: every (stage, group, index) exactly once; every item's
// dependencies (the previous stage's items of its group) numbered before it; apply items cover the
// group's tiles exactly once, last tile first.
int check_numbering(const Schedule& s, const StreamShape& shape, char* msg, int len) {
  std::vector<std::vector<int64_t>> first(kStages, std::vector<int64_t>(s.groups, -1));
  std::vector<std::vector<int64_t>> last(kStages, std::vector<int64_t>(s.groups, -1));
  std::vector<std::vector<int64_t>> count(kStages, std::vector<int64_t>(s.groups, 0));
  for (int k = 1; k < kStages; ++k)
    if (s.lag[k] < s.lag[k - 1]) return fail(msg, len, "lag decreases at stage", k, s.lag[k - 1], s.lag[k]);
  if (s.lag[0] != 0) return fail(msg, len, "lag[0] is not 0", s.lag[0], 0, 0);
  for (int64_t i = 0; i < s.items(); ++i) {
    const Item it = item_of(s, i);
    if (it.stage == kNone) continue;
    if (it.group < 0 || it.group >= s.groups || it.index < 0 || it.index >= s.per[it.stage])
      return fail(msg, len, "item out of range", i, it.group, it.index);
    auto& f = first[it.stage][it.group];
    if (f < 0) f = i;
    if (i - f != it.index) return fail(msg, len, "a group's items of a stage are not consecutive", i, f, it.index);
    last[it.stage][it.group] = i;
    ++count[it.stage][it.group];
  }
  for (int k = 0; k < kStages; ++k)
    for (int64_t g = 0; g < s.groups; ++g) {
      if (count[k][g] != s.per[k]) return fail(msg, len, "stage items of a group not all there", k, g, count[k][g]);
      if (k > 0 && last[k - 1][g] >= first[k][g])
        return fail(msg, len, "an item is numbered before one it waits for", k, g, first[k][g]);
    }
  const int64_t tiles = shape.apply_tiles_per_sample;
  std::vector<int> seen(static_cast<size_t>(s.N * tiles), 0);
  for (int64_t g = 0; g < s.groups; ++g) {
    int64_t previous = -1;
    for (int64_t index = 0; index < s.per[kApply]; ++index)
      for (int warp = 0; warp < shape.tiles_per_block; ++warp) {
        const int64_t tile = apply_tile(s, g, index, warp, tiles, static_cast<int>(shape.tiles_per_block));
        if (tile < 0) continue;
        if (tile < group_first(s, g) * tiles || tile >= group_end(s, g) * tiles)
          return fail(msg, len, "apply tile outside its group", g, index, tile);
        if (previous >= 0 && tile != previous - 1) return fail(msg, len, "apply tiles not last-first", g, previous, tile);
        previous = tile;
        ++seen[static_cast<size_t>(tile)];
      }
  }
  for (size_t t = 0; t < seen.size(); ++t)
    if (seen[t] != 1) return fail(msg, len, "tile not covered exactly once", static_cast<int64_t>(t), seen[t], 0);
  if (shape.pool_tiles_per_block > 1) {  // flat tiles: the pool items' warps take the group's tiles in order
    const int64_t pool = shape.pool_per_sample;
    std::vector<int> pooled(static_cast<size_t>(s.N * pool), 0);
    for (int64_t g = 0; g < s.groups; ++g) {
      int64_t previous = -1;
      for (int64_t index = 0; index < s.per[kPool]; ++index)
        for (int warp = 0; warp < shape.pool_tiles_per_block; ++warp) {
          const int64_t tile = pool_tile(s, g, index, warp, pool, static_cast<int>(shape.pool_tiles_per_block));
          if (tile < 0) continue;
          if (tile < group_first(s, g) * pool || tile >= group_end(s, g) * pool)
            return fail(msg, len, "pool tile outside its group", g, index, tile);
          if (previous >= 0 && tile != previous + 1) return fail(msg, len, "pool tiles out of order", g, previous, tile);
          previous = tile;
          ++pooled[static_cast<size_t>(tile)];
        }
    }
    for (size_t t = 0; t < pooled.size(); ++t)
      if (pooled[t] != 1) return fail(msg, len, "pool tile not covered exactly once", static_cast<int64_t>(t), pooled[t], 0);
  }
  return 0;
}

struct Sim {
  const Schedule& s;
  const int workers;
  std::vector<std::atomic<uint64_t>> counters;  // zeroed once: each launch leaves them zero
  std::vector<std::atomic<int>> claims;         // per item number: claimed how often
  std::vector<std::vector<int64_t>> data;       // per (stage, group): the items' values, plain memory
  std::vector<uint64_t> at_exit;                // the counters as the last worker out found them
  std::atomic<bool> stuck{false};
  Sim(const Schedule& sched, int n_workers)
      : s(sched), workers(n_workers), counters(sched.counters()), claims(sched.items()), data(kStages * sched.groups) {
    for (auto& c : counters) c.store(0);
  }

  // A new launch on the same counters: fresh claims and data.
  void launch() {
    for (auto& c : claims) c.store(0);
    for (int k = 0; k < kStages; ++k)
      for (int64_t g = 0; g < s.groups; ++g) data[k * s.groups + g].assign(s.per[k], 0);
    at_exit.assign(counters.size(), 0);
  }

  // As stream_finish: count out; the last worker out records the counters and sets them to zero.
  void finish() {
    if (counters[s.exit_counter()].fetch_add(1, std::memory_order_acq_rel) != static_cast<uint64_t>(workers - 1))
      return;
    for (size_t k = 0; k < counters.size(); ++k) at_exit[k] = counters[k].load(std::memory_order_acquire);
    for (auto& c : counters) c.store(0, std::memory_order_relaxed);
  }

  int64_t claim() {
    const auto i = static_cast<int64_t>(counters[s.claim_counter()].fetch_add(1, std::memory_order_relaxed));
    if (i < s.items()) claims[i].fetch_add(1, std::memory_order_relaxed);
    return i;
  }

  // As run_streamed: the next number is claimed when an item starts (a worker holds two).
  void worker(uint64_t seed, double wait_limit_s) {
    std::mt19937_64 rng(seed);
    int64_t i = claim();
    for (;;) {
      if (i >= s.items()) return finish();
      const int64_t ahead = claim();
      item(i, rng, wait_limit_s);
      if (stuck.load()) return;
      i = ahead;
    }
  }

  void item(int64_t i, std::mt19937_64& rng, double wait_limit_s) {
    const Item it = item_of(s, i);
    if (it.stage == kNone) return;
    int64_t read = 0;
    if (it.stage != kPool) {
      const auto need = static_cast<uint64_t>(stage_items(s, it.stage - 1));
      const auto start = std::chrono::steady_clock::now();
      while (counters[s.counter(it.group, it.stage - 1)].load(std::memory_order_acquire) < need) {
        std::this_thread::yield();
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > wait_limit_s) {
          stuck.store(true);
          return;
        }
      }
      for (int64_t v : data[(it.stage - 1) * s.groups + it.group]) read += v;
    }
    if (rng() % 8 == 0) std::this_thread::yield();  // vary the interleavings
    data[it.stage * s.groups + it.group][it.index] = value(it.stage, it.group, it.index, read);
    if (it.stage != kApply) counters[s.counter(it.group, it.stage)].fetch_add(1, std::memory_order_release);
  }
};

int run_launch(Sim& sim, int workers, uint64_t seed, char* msg, int len);

int run(const StreamShape& shape, int workers, uint64_t seed, char* msg, int len) {
  Schedule s;
  if (!make_schedule(shape, &s)) return fail(msg, len, "no streamed schedule for this shape", shape.N, shape.kept_bytes, 0);
  if (check_numbering(s, shape, msg, len)) return 1;
  Sim sim(s, workers);
  for (int launch = 0; launch < 2; ++launch) {  // two launches on the same counters
    if (run_launch(sim, workers, seed * 2 + launch, msg, len)) return 1;
  }
  return 0;
}

int run_launch(Sim& sim, int workers, uint64_t seed, char* msg, int len) {
  const Schedule& s = sim.s;
  sim.launch();
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) threads.emplace_back([&sim, seed, w] { sim.worker(seed * 1000 + w, 20.0); });
  for (auto& t : threads) t.join();
  if (sim.stuck.load()) return fail(msg, len, "a worker waited over 20 s: the schedule deadlocks", workers, 0, 0);
  for (int64_t i = 0; i < s.items(); ++i)
    if (sim.claims[i].load() != 1) return fail(msg, len, "item not claimed exactly once", i, sim.claims[i].load(), 0);
  for (size_t k = 0; k < sim.counters.size(); ++k)
    if (sim.counters[k].load() != 0) return fail(msg, len, "a counter left nonzero", static_cast<int64_t>(k), 0, 0);
  if (sim.at_exit[s.claim_counter()] != static_cast<uint64_t>(s.final_claims(workers)))
    return fail(msg, len, "claims at exit", static_cast<int64_t>(sim.at_exit[s.claim_counter()]), s.items(), workers);
  if (sim.at_exit[s.exit_counter()] != static_cast<uint64_t>(workers))
    return fail(msg, len, "exits counted", static_cast<int64_t>(sim.at_exit[s.exit_counter()]), workers, 0);
  for (int64_t g = 0; g < s.groups; ++g) {
    for (int k = 0; k + 1 < kStages; ++k)
      if (sim.at_exit[s.counter(g, k)] != static_cast<uint64_t>(s.per[k]))
        return fail(msg, len, "final count of a (group, stage) counter", g, k, sim.at_exit[s.counter(g, k)]);
    int64_t read = 0;  // the values a sequential run gives
    for (int k = 0; k < kStages; ++k) {
      int64_t sum = 0;
      for (int64_t index = 0; index < s.per[k]; ++index) {
        const int64_t want = value(k, g, index, read);
        if (sim.data[k * s.groups + g][index] != want)
          return fail(msg, len, "an item read its stage's inputs before they were all written", k, g, index);
        sum += want;
      }
      read = sum;
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// shape: N, kept_bytes, l2_budget, pool_per_sample, first_per_group, second_per_group,
// apply_tiles_per_sample, tiles_per_block. out (12): group, groups, per[4], lag[4], rounds, items.
// Returns 1 if the streamed plan applies (out filled), else 0.
int se_stream_schedule(const int64_t* shape, int64_t* out) {
  Schedule s;
  if (!make_schedule(shape_of(shape), &s)) return 0;
  const int64_t v[12] = {s.group, s.groups, s.per[0], s.per[1], s.per[2], s.per[3],
                         s.lag[0], s.lag[1], s.lag[2], s.lag[3], s.rounds(), s.items()};
  for (int k = 0; k < 12; ++k) out[k] = v[k];
  return 1;
}

// (stage, group, index) of every item number of `shape`'s schedule, 3 values an item, into out
// (room for items() * 3); returns the number of items, or -1 if the plan does not apply.
int64_t se_stream_items(const int64_t* shape, int64_t* out) {
  Schedule s;
  if (!make_schedule(shape_of(shape), &s)) return -1;
  for (int64_t i = 0; i < s.items(); ++i) {
    const Item it = item_of(s, i);
    out[3 * i] = it.stage;
    out[3 * i + 1] = it.stage == kNone ? -1 : it.group;
    out[3 * i + 2] = it.stage == kNone ? -1 : it.index;
  }
  return s.items();
}

// Runs the schedule of `shape` with `workers` threads; 0, or 1 with a description in msg.
int se_stream_run(const int64_t* shape, int workers, uint64_t seed, char* msg, int len) {
  return run(shape_of(shape), workers, seed, msg, len);
}

}  // extern "C"

#ifdef SE_STREAM_MAIN
// For ThreadSanitizer: a few shapes (including partial last groups and one item per stage) at
// several worker counts; prints and exits 1 on the first failure.
int main() {
  const int64_t shapes[][9] = {
      {37, 1000, 30000, 3, 1, 2, 5, 8, 1}, {9, 1000, 5000, 2, 2, 3, 17, 8, 1}, {64, 500, 20000, 4, 1, 8, 9, 8, 1},
      {5, 1000, 4000, 1, 1, 1, 1, 8, 1},   {100, 100, 9000, 2, 4, 1, 3, 8, 1}, {37, 1000, 30000, 13, 1, 2, 13, 8, 8},
  };
  char msg[256];
  for (const auto& shape : shapes)
    for (int workers : {1, 2, 4, 7})
      for (uint64_t seed = 0; seed < 3; ++seed)
        if (run(shape_of(shape), workers, seed, msg, sizeof(msg))) {
          std::printf("FAIL N=%lld workers=%d seed=%llu: %s\n", static_cast<long long>(shape[0]), workers,
                      static_cast<unsigned long long>(seed), msg);
          return 1;
        }
  std::printf("ok\n");
  return 0;
}
#endif
