#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "data_parallel_helpers.h"

using syncbn_test::cpu_replicas;

namespace {

// Blocks in copy `target` until released: a replica stuck where nothing of ours can wake it. The state is shared,
// so a replica thread left behind can still use it after the test moved on.
struct Gate {
  std::mutex mutex;
  std::condition_variable opened;
  bool open = false;
  std::atomic<bool> passed{false};
  void release() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      open = true;
    }
    opened.notify_all();
  }
};

struct GatedNetImpl : torch::nn::Cloneable<GatedNetImpl>, syncbn::ReplicationCallback {
  GatedNetImpl(std::shared_ptr<Gate> gate, int64_t target) : gate(std::move(gate)), target(target) { reset(); }
  void reset() override {
    plain = register_module("plain", torch::nn::BatchNorm1d(3));
    synced = register_module("synced", syncbn::SyncBatchNorm1d(3));
  }
  void on_replicate(syncbn::CallbackContext&, int64_t id) override { copy_id = id; }
  torch::Tensor forward(const torch::Tensor& input) {
    if (copy_id == target) {
      std::unique_lock<std::mutex> lock(gate->mutex);
      gate->opened.wait(lock, [&] { return gate->open; });
      gate->passed = true;
    }
    auto output = synced->forward(plain->forward(input));
    if (copy_id == fail_after) throw std::out_of_range("failure after the layers");
    return output;
  }
  std::shared_ptr<Gate> gate;
  int64_t target;
  int64_t fail_after = -1;
  int64_t copy_id = -1;
  torch::nn::BatchNorm1d plain{nullptr};
  syncbn::SyncBatchNorm1d synced{nullptr};
};
TORCH_MODULE(GatedNet);

std::vector<torch::Tensor> snapshot(torch::nn::Module& module) {
  std::vector<torch::Tensor> copies;
  for (const auto& buffer : module.buffers()) copies.push_back(buffer.clone());
  return copies;
}

bool unchanged(torch::nn::Module& module, const std::vector<torch::Tensor>& before) {
  auto buffers = module.buffers();
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (!torch::equal(buffers[i], before[i])) return false;
  }
  return true;
}

}  // namespace

TEST(DataParallel, AReplicaStuckForEverIsLeftBehindAtTheTimeoutAndWritesNothing) {
  ::setenv("SYNCBN_TIMEOUT", "0.5", 1);
  for (int64_t stuck : {0, 2}) {  // replica 0 holds the buffers
    auto gate = std::make_shared<Gate>();
    GatedNet net(gate, stuck);
    const auto before = snapshot(*net);
    const auto start = std::chrono::steady_clock::now();
    try {
      syncbn::data_parallel(net, torch::randn({6, 3}), cpu_replicas(3));
      FAIL() << "expected BarrierTimeoutError";
    } catch (const syncbn::BarrierTimeoutError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find("copies that never arrived: [" + std::to_string(stuck) + "]"), std::string::npos)
          << message;
      EXPECT_NE(message.find("layer 'synced' (synchronized call 1)"), std::string::npos) << message;
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(elapsed, 0.5 + syncbn::detail::kFailureGraceSeconds + 2.0);
    EXPECT_TRUE(unchanged(*net, before));
    gate->release();  // the replica left behind wakes: its replication is closed, it writes nothing
    for (int i = 0; i < 100 && !gate->passed; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    EXPECT_TRUE(gate->passed);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_TRUE(unchanged(*net, before));
  }
  ::unsetenv("SYNCBN_TIMEOUT");
}

TEST(DataParallel, AReplicaStuckAfterTheOthersReturnedIsBoundedByTheTimeout) {
  ::setenv("SYNCBN_TIMEOUT", "0.5", 1);
  auto gate = std::make_shared<Gate>();
  torch::nn::Sequential net(torch::nn::BatchNorm1d(3));
  struct StuckImpl : torch::nn::Cloneable<StuckImpl>, syncbn::ReplicationCallback {
    explicit StuckImpl(std::shared_ptr<Gate> gate) : gate(std::move(gate)) {}
    void reset() override {}
    void on_replicate(syncbn::CallbackContext&, int64_t id) override { copy_id = id; }
    torch::Tensor forward(const torch::Tensor& input) {
      if (copy_id == 1) {
        std::unique_lock<std::mutex> lock(gate->mutex);
        gate->opened.wait(lock, [&] { return gate->open; });
      }
      return input;
    }
    std::shared_ptr<Gate> gate;
    int64_t copy_id = -1;
  };
  net->push_back(std::make_shared<StuckImpl>(gate));
  const auto before = snapshot(*net);
  try {
    syncbn::data_parallel(net, torch::randn({6, 3}), cpu_replicas(3));
    FAIL() << "expected BarrierTimeoutError";
  } catch (const syncbn::BarrierTimeoutError& error) {
    EXPECT_NE(std::string(error.what()).find("replica(s) [1] did not return within 0.5 s"), std::string::npos)
        << error.what();
  }
  EXPECT_TRUE(unchanged(*net, before));  // replica 0 returned, but the forward failed: nothing written back
  gate->release();
  ::unsetenv("SYNCBN_TIMEOUT");
}

TEST(DataParallel, AFailedForwardLeavesEveryBufferUntouched) {
  ::setenv("SYNCBN_TIMEOUT", "300", 1);
  auto gate = std::make_shared<Gate>();
  gate->release();
  GatedNet net(gate, -1);
  net->fail_after = 1;
  const auto before = snapshot(*net);
  EXPECT_THROW(syncbn::data_parallel(net, torch::randn({6, 3}), cpu_replicas(3)), syncbn::ReplicaError);
  EXPECT_TRUE(unchanged(*net, before));  // the plain BatchNorm's and the synchronized one's
  ::unsetenv("SYNCBN_TIMEOUT");
}
