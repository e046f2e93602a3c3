#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

namespace {

// A synchronized BatchNorm (momentum None: a cumulative average, the same for any
// order of the batches) whose forward first sleeps a little, so that forwards
// started at once from several threads overlap.
struct SlowBatchNormImpl : torch::nn::Cloneable<SlowBatchNormImpl> {
  SlowBatchNormImpl() { reset(); }
  void reset() override {
    bn = register_module("bn", syncbn::SyncBatchNorm1d(torch::nn::BatchNormOptions(3).momentum(std::nullopt)));
  }
  torch::Tensor forward(const torch::Tensor& input) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    return bn->forward(input);
  }
  syncbn::SyncBatchNorm1d bn{nullptr};
};
TORCH_MODULE(SlowBatchNorm);

}  // namespace

TEST(DataParallel, TrainingForwardsOfOneModuleFromSeveralThreadsRunOneAfterAnother) {
  torch::manual_seed(0);
  SlowBatchNorm net;
  net->to(torch::kDouble);
  constexpr int kThreads = 3;
  constexpr int kBatches = 24;
  std::vector<torch::Tensor> batches;
  for (int i = 0; i < kBatches; ++i) batches.push_back(torch::randn({6, 3}, torch::kDouble) * (1 + i % 3) + i);
  std::vector<std::exception_ptr> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      try {
        for (int i = t; i < kBatches; i += kThreads) {
          syncbn::data_parallel(net, batches[i], std::vector<torch::Device>(2, torch::kCPU));
        }
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (const auto& error : errors) ASSERT_FALSE(error);

  // Each forward's statistics over its whole batch, replicated from the previous forward's buffers: the cumulative
  // average of all 24, as 24 forwards one after another give (at once, each would write back over the others).
  std::vector<torch::Tensor> means, variances;
  for (const auto& batch : batches) {
    means.push_back(batch.mean(0));
    variances.push_back(batch.var(0));
  }
  EXPECT_EQ(net->bn->num_batches_tracked.item<int64_t>(), kBatches);
  EXPECT_TRUE(torch::allclose(net->bn->running_mean, torch::stack(means).mean(0), 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(net->bn->running_var, torch::stack(variances).mean(0), 1e-10, 1e-10));
}

TEST(DataParallel, ATrainingForwardLockHoldsOnlyInTrainingAndWaitsForTheOneHeld) {
  SlowBatchNorm net;
  auto module = net.ptr();
  std::atomic<bool> second_holds{false};
  std::thread training_forward;
  {
    const syncbn::TrainingForwardLock first(module);
    ASSERT_TRUE(first.held());
    const syncbn::TrainingForwardLock again(module);  // reentrant on its own thread
    EXPECT_TRUE(again.held());

    module->eval();  // an eval forward holds nothing and waits for nothing
    std::thread eval_forward([&] { EXPECT_FALSE(syncbn::TrainingForwardLock(module).held()); });
    eval_forward.join();

    module->train();
    training_forward = std::thread([&] {
      const syncbn::TrainingForwardLock second(module);
      second_holds = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_FALSE(second_holds.load());  // waits for `first` (and `again`), released at the end of this scope
  }
  training_forward.join();
  EXPECT_TRUE(second_holds.load());
}

TEST(DataParallel, TrainingForwardsOfOverlappingModulesFromTwoThreadsKeepEveryUpdate) {
  // data_parallel(net) on one thread, data_parallel(net->bn) on the other: both replicate and write back the
  // same layer's buffers, so each must wait for the other (a lock on the root alone lost about half the updates).
  SlowBatchNorm net;
  constexpr int kSteps = 15;
  const auto x = torch::randn({4, 3});
  auto run = [&](auto module) {
    for (int i = 0; i < kSteps; ++i) syncbn::data_parallel(module, x, std::vector<torch::Device>(2, torch::kCPU));
  };
  std::thread whole([&] { run(net); });
  std::thread part([&] { run(net->bn); });
  whole.join();
  part.join();
  EXPECT_EQ(net->bn->num_batches_tracked.item<int64_t>(), 2 * kSteps);

  // Two trees sharing one layer.
  syncbn::SyncBatchNorm1d shared(3);
  torch::nn::Sequential a(shared, torch::nn::ReLU()), b(shared, torch::nn::Tanh());
  std::thread first([&] { run(a); });
  std::thread second([&] { run(b); });
  first.join();
  second.join();
  EXPECT_EQ(shared->num_batches_tracked.item<int64_t>(), 2 * kSteps);
}

TEST(DataParallel, ForwardsRunDirectlyWaitForReplicatedOnesOfTheSameModule) {
  // A batch of one sample (one chunk) or one device runs the module directly, writing its buffers: without the lock,
  // a replicated forward on another thread wrote its copies back over those writes (half the updates were lost).
  SlowBatchNorm net;
  constexpr int kSteps = 40;
  const auto one_sample = torch::randn({1, 3, 4});
  const auto batch = torch::randn({4, 3, 4});
  std::thread direct([&] {
    for (int i = 0; i < kSteps; ++i) {
      syncbn::data_parallel(net, one_sample, std::vector<torch::Device>(2, torch::kCPU));
      syncbn::data_parallel(net, one_sample, std::vector<torch::Device>(1, torch::kCPU));
    }
  });
  std::thread replicated([&] {
    for (int i = 0; i < 2 * kSteps; ++i) syncbn::data_parallel(net, batch, std::vector<torch::Device>(2, torch::kCPU));
  });
  direct.join();
  replicated.join();
  EXPECT_EQ(net->bn->num_batches_tracked.item<int64_t>(), 4 * kSteps);
}

TEST(DataParallel, ATrainingForwardLockHoldsEveryModuleWithBuffersOfItsTree) {
  SlowBatchNorm net;
  torch::nn::Sequential other(net->bn, torch::nn::ReLU());  // shares the layer
  std::atomic<int> holding{0};
  std::vector<std::thread> waiting;
  {
    const syncbn::TrainingForwardLock whole(net.ptr());
    ASSERT_TRUE(whole.held());
    waiting.emplace_back([&] {
      const syncbn::TrainingForwardLock part(net->bn.ptr());
      ++holding;
    });
    waiting.emplace_back([&] {
      const syncbn::TrainingForwardLock sharing(other.ptr());
      ++holding;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(holding.load(), 0);  // both wait for `whole`
  }
  for (auto& thread : waiting) thread.join();
  EXPECT_EQ(holding.load(), 2);

  // A tree without buffers (nothing to write back) holds nothing.
  torch::nn::Sequential no_buffers(torch::nn::Linear(2, 2));
  EXPECT_FALSE(syncbn::TrainingForwardLock(no_buffers.ptr()).held());
}
