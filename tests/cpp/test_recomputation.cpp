#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "data_parallel_helpers.h"

using syncbn_test::cpu_replicas;

namespace {

// Runs a callback inside backward, as torch.utils.checkpoint recomputes a block.
struct RunInBackward : torch::autograd::Function<RunInBackward> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x) { return x.clone(); }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    (*body)();
    return grads;
  }
  static std::function<void()>* body;
};
std::function<void()>* RunInBackward::body = nullptr;

void run_in_backward(std::function<void()> body) {
  RunInBackward::body = &body;
  RunInBackward::apply(torch::ones({1}, torch::requires_grad())).sum().backward();
  RunInBackward::body = nullptr;
}

}  // namespace

TEST(SyncBatchNormModule, ARecomputationInsideBackwardReusesTheCallsStatisticsWithoutABarrier) {
  torch::manual_seed(3);
  syncbn::SyncBatchNorm1d bn(3);
  bn->to(torch::kDouble);
  auto replicas = syncbn::replicate(bn, cpu_replicas(2));
  std::vector<torch::Tensor> slices{torch::randn({4, 3}, torch::kDouble), torch::randn({3, 3}, torch::kDouble) * 3};
  auto outputs = syncbn::parallel_apply(replicas, slices, cpu_replicas(2));
  const auto running_mean = bn->running_mean.clone();
  const int64_t counted = bn->num_batches_tracked.item<int64_t>();
  EXPECT_EQ(counted, 1);
  // Each replica recomputes its call alone, one after the other (a barrier would wait for ever): same output,
  // and nothing written.
  run_in_backward([&] {
    for (int64_t i : {1, 0}) {
      EXPECT_TRUE(torch::equal(replicas[i]->forward(slices[i]), outputs[i])) << "replica " << i;
    }
  });
  EXPECT_TRUE(torch::equal(bn->running_mean, running_mean));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), counted);
  // A recomputation that repeats no call of the forward is an error that names checkpointing.
  run_in_backward([&] {
    try {
      replicas[1]->forward(slices[1] + 1);
      ADD_FAILURE() << "expected an error";
    } catch (const c10::Error& error) {
      EXPECT_NE(std::string(error.what()).find("torch.utils.checkpoint"), std::string::npos) << error.what();
    }
  });
}

TEST(SyncBatchNormModule, ARecomputationOfAForwardRunWithoutGradientsNamesReentrantCheckpointing) {
  syncbn::SyncBatchNorm1d bn(3);
  auto replicas = syncbn::replicate(bn, cpu_replicas(2));
  std::vector<torch::Tensor> slices{torch::randn({4, 3}), torch::randn({4, 3})};
  {
    torch::NoGradGuard no_grad;  // as torch.utils.checkpoint(use_reentrant=True) runs the forward
    syncbn::parallel_apply(replicas, slices, cpu_replicas(2));
  }
  run_in_backward([&] {
    try {
      replicas[0]->forward(slices[0]);
      ADD_FAILURE() << "expected an error";
    } catch (const c10::Error& error) {
      EXPECT_NE(std::string(error.what()).find("use_reentrant=False"), std::string::npos) << error.what();
    }
  });
}
