// Shared by the timing tools in this folder (standalone programs, not part of the build).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace nsa::tools {

// Exits with a message on a CUDA error.
inline void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// The times of `reps` runs of launch() on the default stream, each between its own pair of events, in ms,
// sorted ascending (the median is [reps / 2], the fastest [0]).
template <typename Launch>
std::vector<float> sorted_run_ms(int reps, Launch&& launch) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "event");
  ok(cudaEventCreate(&b), "event");
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    ok(cudaEventRecord(a), "record");
    launch();
    ok(cudaEventRecord(b), "record");
    ok(cudaEventSynchronize(b), "sync");
    float e = 0;
    ok(cudaEventElapsedTime(&e, a, b), "elapsed");
    ms.push_back(e);
  }
  ok(cudaEventDestroy(a), "event");
  ok(cudaEventDestroy(b), "event");
  std::sort(ms.begin(), ms.end());
  return ms;
}

}  // namespace nsa::tools
