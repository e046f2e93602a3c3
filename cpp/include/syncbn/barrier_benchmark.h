#pragma once

#include <cstdint>

#include <syncbn/export.h>

namespace syncbn {

// Median round trip, in microseconds, of a SyncMaster pass with `replicas`
// std::threads (one master, replicas - 1 slaves), each pass carrying one small
// tensor per copy and a master callback that sums them. `warmup` passes are run
// first and not timed. The C++ baseline for the Python-threads measurement.
SYNCBN_API double measure_barrier_round_trip_us(int64_t replicas, int64_t passes, int64_t warmup = 50);

}  // namespace syncbn
