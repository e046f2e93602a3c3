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
