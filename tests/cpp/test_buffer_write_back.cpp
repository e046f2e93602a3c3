#include <gtest/gtest.h>

#include <optional>
#include <string>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "data_parallel_helpers.h"

using syncbn_test::cpu_replicas;
using syncbn_test::expect_close;
using syncbn_test::matching_layers;

namespace {

// Resizes a buffer in place (as torch's per-channel observers do); holds a sparse one too (which at::equal cannot
// compare).
struct KeepsItsLastBatchImpl : torch::nn::Cloneable<KeepsItsLastBatchImpl> {
  KeepsItsLastBatchImpl() { reset(); }
  void reset() override {
    last = register_buffer("last", torch::empty({0}));
    register_buffer("pairs", torch::eye(2).to_sparse());
  }
  torch::Tensor forward(const torch::Tensor& input) {
    last.resize_({input.size(0)}).copy_(input.select(1, 0).detach());
    return input;
  }
  torch::Tensor last;
};
TORCH_MODULE(KeepsItsLastBatch);

// Writes its buffer through a member that refers to it and that clone() copies as it is: every replica writes the
// module's tensor.
struct MarksThroughAnAliasImpl : torch::nn::Cloneable<MarksThroughAnAliasImpl> {
  MarksThroughAnAliasImpl() {
    reset();
    alias = mark;
  }
  void reset() override { mark = register_buffer("mark", torch::zeros({2})); }
  torch::Tensor forward(const torch::Tensor& input) {
    alias.fill_(7.0);
    return input;
  }
  torch::Tensor mark, alias;
};
TORCH_MODULE(MarksThroughAnAlias);

}  // namespace

TEST(DataParallel, EveryBufferReplicaZeroChangesReachesTheModuleAsOnGpus) {
  // Replica 0 writes copies of the buffers, copied back after the forward: also those a kernel writes without
  // counting a version (torch::nn::BatchNorm's running statistics), resized if replica 0 resized them; not one the
  // module wrote directly (its copy would undo the write).
  torch::nn::Sequential net(torch::nn::BatchNorm1d(3), KeepsItsLastBatch(), MarksThroughAnAlias());
  torch::nn::Sequential reference(torch::nn::BatchNorm1d(3), KeepsItsLastBatch(), MarksThroughAnAlias());
  const auto x = torch::randn({6, 3}) * 3 + 1;
  for (int step = 0; step < 2; ++step) {
    syncbn::data_parallel(net, x + step, cpu_replicas(3));
    reference->forward(x.slice(0, 0, 2) + step);  // replica 0's slice
    const auto buffers = net->named_buffers();
    for (const auto& expected : reference->named_buffers()) {
      const auto& buffer = buffers[expected.key()];
      EXPECT_TRUE(torch::allclose(buffer.to_dense(), expected.value().to_dense()))
          << expected.key() << " at step " << step;
    }
  }
}

TEST(DataParallel, ALayerRegisteredAtTwoPlacesUpdatesItsStatisticsTwiceAsAlone) {
  // clone() makes it two layers in each replica; replica 0's copies of its buffers were two, each written back over
  // the other (one update of two).
  auto [synced, reference] = matching_layers(torch::nn::BatchNormOptions(3));
  torch::nn::Sequential net(synced, torch::nn::Tanh(), synced);
  torch::nn::Sequential alone(reference, torch::nn::Tanh(), reference);
  const auto x = torch::randn({6, 3, 2, 2}, torch::kDouble) * 2 + 1;
  for (int step = 0; step < 2; ++step) {
    expect_close(syncbn::data_parallel(net, x, cpu_replicas(2)), alone->forward(x), "output");
  }
  EXPECT_EQ(synced->num_batches_tracked.item<int64_t>(), 4);
  expect_close(synced->running_mean, reference->running_mean, "running_mean");
  expect_close(synced->running_var, reference->running_var, "running_var");
}

TEST(DataParallel, InferenceModeForwardsUpdateAndReadTheBuffersAsOnGpus) {
  // Under c10::InferenceMode replica 0's copies of the buffers are inference tensors, which count no version: they
  // are compared instead. The synchronized layer gives the whole batch's outputs and statistics; a
  // torch::nn::BatchNorm gets replica 0's update, as on GPUs; in eval mode nothing changes. Also for a module built
  // under inference mode (its own buffers inference tensors).
  for (const bool built_inside : {false, true}) {
    for (const bool training : {true, false}) {
      std::optional<c10::InferenceMode> building;
      if (built_inside) building.emplace();
      torch::manual_seed(0);
      auto [synced, reference] = matching_layers(torch::nn::BatchNormOptions(3));
      torch::nn::BatchNorm1d plain(3), plain_reference(3);
      building.reset();
      synced->train(training);
      reference->train(training);
      plain->train(training);
      plain_reference->train(training);
      const auto x = torch::randn({6, 3, 2, 2}, torch::kDouble) * 3 + 1;
      const auto x_plain = torch::randn({6, 3}) * 3 + 1;
      for (int step = 0; step < 2; ++step) {
        const std::string where = std::string(built_inside ? "built inside" : "built outside") +
                                  (training ? ", training" : ", eval") + ", step " + std::to_string(step);
        c10::InferenceMode inference;
        expect_close(syncbn::data_parallel(synced, x + step, cpu_replicas(2)), reference->forward(x + step),
                     "output, " + where);
        expect_close(synced->running_mean, reference->running_mean, "running_mean, " + where);
        expect_close(synced->running_var, reference->running_var, "running_var, " + where);
        EXPECT_EQ(synced->num_batches_tracked.item<int64_t>(), reference->num_batches_tracked.item<int64_t>()) << where;
        syncbn::data_parallel(plain, x_plain + step, cpu_replicas(2));
        plain_reference->forward(x_plain.slice(0, 0, 3) + step);  // replica 0's slice
        EXPECT_TRUE(torch::allclose(plain->running_mean, plain_reference->running_mean)) << "plain, " << where;
        EXPECT_TRUE(torch::allclose(plain->running_var, plain_reference->running_var)) << "plain, " << where;
      }
    }
  }
}
