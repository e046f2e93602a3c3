#include <syncbn/barrier_benchmark.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <syncbn/sync_master.h>

namespace syncbn {

double measure_barrier_round_trip_us(int64_t replicas, int64_t passes, int64_t warmup) {
  TORCH_CHECK_VALUE(replicas >= 1, "replicas must be at least 1, got ", replicas);
  TORCH_CHECK_VALUE(passes >= 1 && warmup >= 0, "passes must be positive and warmup non-negative");
  // Each copy sends a small tensor and its copy id; every copy gets back the
  // sum of the ids and its own tensor: the barrier's cost, not the math's.
  SyncMaster master([](MessageList messages) {
    int64_t id_sum = 0;
    for (const auto& entry : messages) id_sum += entry.second.ints.at(0);
    MessageList results;
    results.reserve(messages.size());
    for (auto& entry : messages) {
      results.emplace_back(entry.first, Message{std::move(entry.second.tensors), {id_sum}, nullptr});
    }
    return results;
  });
  std::vector<std::shared_ptr<SlavePipe>> pipes;
  for (int64_t id = 1; id < replicas; ++id) pipes.push_back(master.register_slave(id));

  const int64_t total = passes + warmup;
  std::vector<std::thread> slaves;
  for (auto& pipe : pipes) {
    slaves.emplace_back([pipe, total] {
      at::Tensor payload = at::ones({1});
      for (int64_t pass = 0; pass < total; ++pass) {
        pipe->run_slave(Message{{payload}, {pipe->copy_id()}, nullptr});
      }
    });
  }
  std::vector<double> round_trips_us;
  round_trips_us.reserve(passes);
  at::Tensor payload = at::ones({1});
  for (int64_t pass = 0; pass < total; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    master.run_master(Message{{payload}, {0}, nullptr});
    const auto stop = std::chrono::steady_clock::now();
    if (pass >= warmup) round_trips_us.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
  }
  for (auto& thread : slaves) thread.join();
  std::nth_element(round_trips_us.begin(), round_trips_us.begin() + round_trips_us.size() / 2, round_trips_us.end());
  return round_trips_us[round_trips_us.size() / 2];
}

}  // namespace syncbn
