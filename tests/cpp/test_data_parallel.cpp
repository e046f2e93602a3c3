#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <utility>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "data_parallel_helpers.h"

using syncbn_test::cpu_replicas;
using syncbn_test::expect_close;
using syncbn_test::matching_layers;

namespace {

class DataParallelBatchNorm : public ::testing::TestWithParam<std::optional<double>> {};

TEST_P(DataParallelBatchNorm, FourCpuReplicasEqualOneBatchNormOnTheWholeBatch) {
  torch::manual_seed(0);
  auto [synced, reference] = matching_layers(torch::nn::BatchNormOptions(3).momentum(GetParam()));

  for (int step = 0; step < 3; ++step) {
    // Batch 10 over 4 replicas: uneven slices of 3, 3, 3 and 1.
    auto x = (torch::randn({10, 3, 5, 5}, torch::kDouble) * 2 + step).requires_grad_();
    auto x_ref = x.detach().clone().requires_grad_();
    auto grad_out = torch::randn({10, 3, 5, 5}, torch::kDouble);
    synced->zero_grad();
    reference->zero_grad();

    auto y = syncbn::data_parallel(synced, x, cpu_replicas(4));
    auto y_ref = reference->forward(x_ref);
    y.backward(grad_out);
    y_ref.backward(grad_out);

    expect_close(y, y_ref, "output");
    expect_close(x.grad(), x_ref.grad(), "input gradient");
    expect_close(synced->weight.grad(), reference->weight.grad(), "weight gradient");
    expect_close(synced->bias.grad(), reference->bias.grad(), "bias gradient");
    expect_close(synced->running_mean, reference->running_mean, "running_mean");
    expect_close(synced->running_var, reference->running_var, "running_var");
    EXPECT_EQ(synced->num_batches_tracked.item<int64_t>(), reference->num_batches_tracked.item<int64_t>());
  }
  EXPECT_EQ(synced->num_batches_tracked.item<int64_t>(), 3);

  // Eval mode normalizes with the running statistics, exactly as torch::nn::BatchNorm2d.
  synced->eval();
  reference->eval();
  auto x = torch::randn({4, 3, 5, 5}, torch::kDouble);
  expect_close(syncbn::data_parallel(synced, x, cpu_replicas(2)), reference->forward(x), "eval output");
}

INSTANTIATE_TEST_SUITE_P(Momentum, DataParallelBatchNorm, ::testing::Values(std::optional<double>(0.1), std::nullopt));

TEST(DataParallel, AGradientPenaltyThroughCpuReplicasEqualsOneBatchNormsDoubleBackward) {
  // create_graph through the replicas (autograd's serial backward): a second backward gets the whole batch's
  // second-order terms, through the merge of the copies' statistics.
  torch::manual_seed(5);
  auto [synced, reference] = matching_layers(torch::nn::BatchNormOptions(3));
  auto x = torch::randn({7, 3, 2, 2}, torch::kDouble).requires_grad_();
  auto x_ref = x.detach().clone().requires_grad_();
  auto penalty = [](const torch::Tensor& y, const torch::Tensor& input) {
    auto grads = torch::autograd::grad({y.pow(3).sum()}, {input}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    return grads[0].square().sum();
  };
  penalty(syncbn::data_parallel(synced, x, cpu_replicas(3)), x).backward();
  penalty(reference->forward(x_ref), x_ref).backward();
  expect_close(x.grad(), x_ref.grad(), "input gradient of the penalty");
  expect_close(synced->weight.grad(), reference->weight.grad(), "weight gradient of the penalty");
  expect_close(synced->bias.grad(), reference->bias.grad(), "bias gradient of the penalty");
}

// A net that raises in the replica whose slice contains the marker value.
struct FlakyNetImpl : torch::nn::Cloneable<FlakyNetImpl> {
  enum class Error { kStd, kC10, kNotStd };
  explicit FlakyNetImpl(Error error = Error::kStd) : error(error) { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 4, 3).padding(1)));
    bn = register_module("bn", syncbn::SyncBatchNorm2d(4));
  }
  torch::Tensor forward(const torch::Tensor& input) {
    if ((input == -1000).any().item<bool>()) {
      if (error == Error::kC10) TORCH_CHECK_VALUE(false, "marker found");
      if (error == Error::kNotStd) throw 42;  // NOLINT: a type not derived from std::exception
      throw std::out_of_range("marker found");
    }
    return bn->forward(conv->forward(input));
  }
  Error error;
  torch::nn::Conv2d conv{nullptr};
  syncbn::SyncBatchNorm2d bn{nullptr};
};
TORCH_MODULE(FlakyNet);

TEST(DataParallel, AFailingReplicaRaisesWithItsCopyIdAndTheNextForwardWorks) {
  FlakyNet net;
  auto x = torch::randn({8, 2, 4, 4});
  x[5][0][0][0] = -1000;  // in replica 2's slice of 2
  try {
    syncbn::data_parallel(net, x, cpu_replicas(4));
    FAIL() << "expected a ReplicaError";
  } catch (const syncbn::ReplicaError& error) {
    EXPECT_EQ(error.copy_id(), 2);
    EXPECT_NE(std::string(error.what()).find("marker found in replica 2 on device cpu"), std::string::npos)
        << error.what();
    try {
      std::rethrow_if_nested(error);
      FAIL() << "the original exception is nested";
    } catch (const std::out_of_range&) {
    }
  }
  // c10 errors keep their type and name the replica in their context.
  FlakyNet c10_net(FlakyNetImpl::Error::kC10);
  try {
    syncbn::data_parallel(c10_net, x, cpu_replicas(4));
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("in replica 2 on device cpu"), std::string::npos) << error.what();
  }
  // Anything else thrown is nested in a ReplicaError too.
  FlakyNet odd_net(FlakyNetImpl::Error::kNotStd);
  try {
    syncbn::data_parallel(odd_net, x, cpu_replicas(4));
    FAIL() << "expected a ReplicaError";
  } catch (const syncbn::ReplicaError& error) {
    EXPECT_EQ(error.copy_id(), 2);
    try {
      std::rethrow_if_nested(error);
      FAIL() << "the original exception is nested";
    } catch (int thrown) {
      EXPECT_EQ(thrown, 42);
    }
  }
  auto y = syncbn::data_parallel(net, torch::randn({8, 2, 4, 4}), cpu_replicas(4));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{8, 4, 4, 4}));
}

// Calls its synchronized layer from a thread of its own.
struct LayerOnAnotherThreadImpl : torch::nn::Cloneable<LayerOnAnotherThreadImpl> {
  LayerOnAnotherThreadImpl() { reset(); }
  void reset() override { bn = register_module("bn", syncbn::SyncBatchNorm1d(3)); }
  torch::Tensor forward(const torch::Tensor& input) {
    return std::async(std::launch::async, [&] { return bn->forward(input); }).get();
  }
  syncbn::SyncBatchNorm1d bn{nullptr};
};
TORCH_MODULE(LayerOnAnotherThread);

TEST(DataParallel, ALayerCalledFromAThreadOfTheForwardsOwnIsRefusedAndWritesNothing) {
  // The copies' calls pair in the order each copy makes them: from other threads they would pair at random.
  LayerOnAnotherThread net;
  try {
    syncbn::data_parallel(net, torch::randn({6, 3}), cpu_replicas(2));
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("was called from a thread other than the one running replica"),
              std::string::npos)
        << error.what();
  }
  EXPECT_EQ(net->bn->num_batches_tracked.item<int64_t>(), 0);
  EXPECT_TRUE(net->bn->running_mean.eq(0).all().item<bool>());
  // Alone, any thread will do.
  EXPECT_EQ(net->forward(torch::randn({6, 3})).sizes(), (std::vector<int64_t>{6, 3}));
}

// Raises in one copy, or calls its BatchNorm an extra time there: knows its copy id from the replication hook.
struct MisbehavingNetImpl : torch::nn::Cloneable<MisbehavingNetImpl>, syncbn::ReplicationCallback {
  enum class Fault { kNone, kRaiseBetween, kRaiseAfter, kExtraCall };
  explicit MisbehavingNetImpl(Fault fault = Fault::kNone) : fault(fault) { reset(); }
  void reset() override {
    bn1 = register_module("bn1", syncbn::SyncBatchNorm1d(3));
    bn2 = register_module("bn2", syncbn::SyncBatchNorm1d(3));
  }
  void on_replicate(syncbn::CallbackContext&, int64_t id) override { copy_id = id; }
  torch::Tensor forward(const torch::Tensor& input) {
    const bool faulty = copy_id == 2;
    auto x = bn1->forward(input);
    if (faulty && fault == Fault::kRaiseBetween) throw std::out_of_range("failure between the layers");
    x = bn2->forward(x);
    if (faulty && fault == Fault::kExtraCall) x = bn2->forward(x);
    if (faulty && fault == Fault::kRaiseAfter) throw std::out_of_range("failure after the layers");
    return x;
  }
  Fault fault;
  int64_t copy_id = -1;
  syncbn::SyncBatchNorm1d bn1{nullptr}, bn2{nullptr};
};
TORCH_MODULE(MisbehavingNet);

TEST(DataParallel, FailuresBetweenAndAfterLayersAndCallCountMismatchesFailFast) {
  ::setenv("SYNCBN_TIMEOUT", "300", 1);  // a hang would trip the test's 120 s limit instead
  for (auto fault : {MisbehavingNetImpl::Fault::kRaiseBetween, MisbehavingNetImpl::Fault::kRaiseAfter}) {
    MisbehavingNet net(fault);
    const auto before = net->bn2->running_mean.clone();
    try {
      syncbn::data_parallel(net, torch::randn({8, 3}), cpu_replicas(4));
      FAIL() << "expected a ReplicaError";
    } catch (const syncbn::ReplicaError& error) {
      EXPECT_EQ(error.copy_id(), 2) << error.what();
    }
    // A failed forward writes nothing, not even the statistics of the passes that completed before the failure.
    EXPECT_TRUE(torch::equal(net->bn2->running_mean, before)) << "a failed forward leaves the buffers untouched";
    EXPECT_EQ(net->bn2->num_batches_tracked.item<int64_t>(), 0);
    EXPECT_EQ(net->bn1->num_batches_tracked.item<int64_t>(), 0);
  }
  MisbehavingNet extra(MisbehavingNetImpl::Fault::kExtraCall);
  try {
    syncbn::data_parallel(extra, torch::randn({8, 3}), cpu_replicas(4));
    FAIL() << "expected an error";
  } catch (const syncbn::BarrierError& error) {  // rethrown as it is: it names the layers and copies
    const std::string message = error.what();
    EXPECT_NE(message.find("finished its forward after 2 synchronized call(s), but copy 2 made call 3"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find("layer 'bn2' (synchronized call 3)"), std::string::npos) << message;
  }
  MisbehavingNet healthy;
  EXPECT_EQ(syncbn::data_parallel(healthy, torch::randn({8, 3}), cpu_replicas(4)).size(0), 8);
  ::unsetenv("SYNCBN_TIMEOUT");
}

TEST(DataParallel, SmallBatchesUseFewerReplicasAndOneDeviceRunsDirectly) {
  torch::manual_seed(1);
  syncbn::SyncBatchNorm1d synced(3);
  torch::nn::BatchNorm1d reference(3);
  synced->to(torch::kDouble);
  reference->to(torch::kDouble);
  auto x = torch::randn({2, 3}, torch::kDouble);
  expect_close(syncbn::data_parallel(synced, x, cpu_replicas(4)), reference->forward(x), "batch 2 over 4 replicas");
  expect_close(syncbn::data_parallel(synced, x, cpu_replicas(1)), reference->forward(x), "one device");
}

TEST(DataParallel, OutputsOfTheOther16BitTypeThanAutocastsAreGathered) {
  // autocast leaves BatchNorm in the module's type; cat under CPU autocast refused float16 under bfloat16 autocast.
  torch::manual_seed(2);
  syncbn::SyncBatchNorm2d synced(3);
  synced->to(torch::kHalf);
  auto x = torch::randn({4, 3, 5, 5}).to(torch::kHalf);
  const bool was_enabled = at::autocast::is_autocast_enabled(at::kCPU);
  const at::ScalarType was_dtype = at::autocast::get_autocast_dtype(at::kCPU);
  at::autocast::set_autocast_enabled(at::kCPU, true);
  at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  torch::Tensor out;
  EXPECT_NO_THROW(out = syncbn::data_parallel(synced, x, cpu_replicas(2)));
  at::autocast::set_autocast_enabled(at::kCPU, was_enabled);
  at::autocast::set_autocast_dtype(at::kCPU, was_dtype);
  ASSERT_TRUE(out.defined());
  EXPECT_EQ(out.scalar_type(), torch::kHalf);
  torch::nn::BatchNorm2d reference(3);
  const torch::Tensor expected = reference->forward(x.to(torch::kFloat));
  EXPECT_TRUE(torch::allclose(out.to(torch::kFloat), expected, 2e-2, 2e-2))  // float16 rounding
      << "max difference " << (out.to(torch::kFloat) - expected).abs().max().item<double>();
}

TEST(DataParallel, NoChannelsRaisesTheIndexErrorTorchBatchNormRaises) {
  auto x = torch::randn({4, 0, 2, 2});
  EXPECT_THROW(torch::nn::BatchNorm2d(0)->forward(x), c10::IndexError);
  EXPECT_THROW(syncbn::SyncBatchNorm2d(0)->forward(x), c10::IndexError);
  syncbn::SyncBatchNorm2d synced(0);
  EXPECT_THROW(syncbn::data_parallel(synced, x, cpu_replicas(2)), c10::IndexError);
}

// Returns a scalar loss per replica, or an output the replicas' outputs cannot be joined with.
struct LossNetImpl : torch::nn::Cloneable<LossNetImpl> {
  enum class Output { kScalar, kUndefinedForOneRow, kRowOfItsOwnWidth };
  explicit LossNetImpl(Output kind = Output::kScalar) : output(kind) { reset(); }
  void reset() override { bn = register_module("bn", syncbn::SyncBatchNorm1d(3)); }
  torch::Tensor forward(const torch::Tensor& x) {
    const torch::Tensor y = bn->forward(x);
    switch (output) {
      case Output::kScalar:
        return y.pow(2).mean();
      case Output::kUndefinedForOneRow:
        return x.size(0) == 1 ? torch::Tensor() : y;
      case Output::kRowOfItsOwnWidth:
        return y.reshape({1, -1});
    }
    return y;
  }
  Output output;
  syncbn::SyncBatchNorm1d bn{nullptr};
};
TORCH_MODULE(LossNet);

TEST(DataParallel, ScalarOutputsAreStackedIntoAVectorAsNnDataParallelDoes) {
  torch::manual_seed(3);
  LossNet net;
  net->to(torch::kDouble);
  torch::nn::BatchNorm1d reference(3);
  reference->to(torch::kDouble);
  const auto x = torch::randn({8, 3}, torch::kDouble);
  const torch::Tensor losses = syncbn::data_parallel(net, x, cpu_replicas(4));
  const torch::Tensor expected = torch::stack(
      torch::fmap(reference->forward(x).pow(2).chunk(4), [](const torch::Tensor& part) { return part.mean(); }));
  expect_close(losses, expected, "one loss per replica, the whole batch's statistics");
  EXPECT_EQ(net->bn->num_batches_tracked.item<int64_t>(), 1);
}

TEST(DataParallel, OutputsThatCannotBeGatheredFailNamingTheReplicaAndLeaveTheBuffersUntouched) {
  // Before, the buffers were written back before the outputs were joined: the error came with the running
  // statistics already updated.
  const auto x = torch::randn({7, 3});  // over 4 replicas: 2, 2, 2 and 1 rows
  for (const auto kind : {LossNetImpl::Output::kUndefinedForOneRow, LossNetImpl::Output::kRowOfItsOwnWidth}) {
    LossNet net(kind);
    const torch::Tensor running_mean = net->bn->running_mean.clone();
    try {
      syncbn::data_parallel(net, x, cpu_replicas(4));
      ADD_FAILURE() << "gathered outputs that cannot be joined";
    } catch (const c10::Error& error) {
      if (kind == LossNetImpl::Output::kUndefinedForOneRow) {
        EXPECT_NE(std::string(error.what()).find("replica 3 returned an undefined tensor"), std::string::npos)
            << error.what();
      }
    }
    EXPECT_EQ(net->bn->num_batches_tracked.item<int64_t>(), 0);
    EXPECT_TRUE(torch::equal(net->bn->running_mean, running_mean));
  }
}

TEST(DataParallel, FrozenParametersStayFrozenInTheReplicas) {
  // clone() registers every parameter anew, requiring grad: before, a frozen model's output required grad under
  // data_parallel, and a backward through it succeeded where torch's raises.
  syncbn::SyncBatchNorm2d frozen(3);
  for (auto& parameter : frozen->parameters()) parameter.requires_grad_(false);
  EXPECT_FALSE(syncbn::data_parallel(frozen, torch::randn({8, 3, 2, 2}), cpu_replicas(4)).requires_grad());

  torch::nn::Linear linear(3, 3);
  linear->weight.requires_grad_(false);
  for (const auto& replica : syncbn::replicate(linear.ptr(), cpu_replicas(2))) {
    EXPECT_FALSE(replica->weight.requires_grad());
    EXPECT_TRUE(replica->bias.requires_grad());
  }
  syncbn::data_parallel(linear, torch::randn({8, 3}), cpu_replicas(2)).sum().backward();
  EXPECT_FALSE(linear->weight.grad().defined());
  EXPECT_TRUE(linear->bias.grad().defined());
}

TEST(DataParallel, AModuleNotOnTheFirstDeviceIsRefusedBeforeAnythingRuns) {
  // Before, CUDA devices given a CPU module cloned replica 0 onto the GPU, whose running statistics were then never
  // written back (its buffers were on another device than the module's). Checked before any tensor moves, so the
  // check runs without a GPU.
  syncbn::SyncBatchNorm1d bn(3);
  // Two devices, and one (which skipped the check: an ATen device mismatch from inside the forward, or a forward
  // on the CPU with the input moved to the GPU).
  for (const auto& gpus : {std::vector<torch::Device>{torch::Device(torch::kCUDA, 0), torch::Device(torch::kCUDA, 1)},
                           std::vector<torch::Device>{torch::Device(torch::kCUDA, 0)}}) {
    try {
      syncbn::data_parallel(bn, torch::randn({8, 3}), gpus);
      ADD_FAILURE() << "a CPU module ran on " << gpus.size() << " CUDA device(s)";
    } catch (const c10::ValueError& error) {
      EXPECT_NE(std::string(error.what()).find("the module must have its parameters and buffers on device cuda:0"),
                std::string::npos)
          << error.what();
    }
  }
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 0);
}

// x minus the whole batch's mean through a SyncMaster of the module's own (the established library's pattern),
// added to the replication group; copy 1 may skip its pass.
struct CenterImpl : torch::nn::Cloneable<CenterImpl>, syncbn::ReplicationCallback {
  explicit CenterImpl(bool copy_one_skips = false) : copy_one_skips(copy_one_skips) {}
  void reset() override {}
  void on_replicate(syncbn::CallbackContext& context, int64_t copy_id) override {
    copy = copy_id;
    pipe.reset();
    master.reset();
    if (copy_id == 0) {
      master = std::make_shared<syncbn::SyncMaster>([](syncbn::MessageList messages) {
        torch::Tensor sum = torch::zeros_like(messages.front().second.tensors[0]);
        int64_t count = 0;
        for (auto& entry : messages) {
          sum += entry.second.tensors[0];
          count += entry.second.ints[0];
        }
        syncbn::MessageList results;
        for (auto& entry : messages) results.emplace_back(entry.first, syncbn::Message{{sum / count}, {}, nullptr, {}});
        return results;
      });
      context.set("master", master);
      context.group()->add_barrier(master);
    } else {
      pipe = context.get<std::shared_ptr<syncbn::SyncMaster>>("master")->register_slave(copy_id);
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    if (copy_one_skips && copy == 1) return x;
    syncbn::Message message{{x.sum(0)}, {x.size(0)}, nullptr, {}};
    syncbn::Message mean = master ? master->run_master(std::move(message)) : pipe->run_slave(std::move(message));
    return x - mean.tensors[0];
  }
  bool copy_one_skips;
  int64_t copy = -1;
  std::shared_ptr<syncbn::SyncMaster> master;
  std::shared_ptr<syncbn::SlavePipe> pipe;
};
TORCH_MODULE(Center);

TEST(DataParallel, ABarrierOfTheModulesOwnAddedToTheGroupLearnsWhichCopiesReturned) {
  ::setenv("SYNCBN_TIMEOUT", "300", 1);  // waiting for it would trip the test's limit instead
  auto x = torch::randn({9, 4}, torch::kDouble);
  Center healthy;
  expect_close(syncbn::data_parallel(healthy, x, cpu_replicas(3)), x - x.mean(0), "a module's own SyncMaster");
  // Copy 1 returns without its pass: the copies waiting for it must fail at once, not after the timeout.
  Center skipping(true);
  const auto start = std::chrono::steady_clock::now();
  try {
    syncbn::data_parallel(skipping, x, cpu_replicas(3));
    FAIL() << "expected a BarrierError";
  } catch (const syncbn::BarrierError& error) {
    EXPECT_NE(std::string(error.what()).find("copy 1 finished its forward"), std::string::npos) << error.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  ::unsetenv("SYNCBN_TIMEOUT");
}

TEST(ParallelApply, ABarrierOfTheModulesOwnLearnsWhichCopiesReturnedWithoutAGroupGiven) {
  // syncbn::replicate returns the replicas only: their group (which the barrier was added to) was gone, so a copy
  // that returned without its pass left the others waiting the whole timeout, and a failure left them blocked.
  ::setenv("SYNCBN_TIMEOUT", "300", 1);
  auto x = torch::randn({9, 4}, torch::kDouble);
  const auto inputs = x.chunk(3);
  const auto start = std::chrono::steady_clock::now();
  try {
    Center skipping(true);
    auto replicas = syncbn::replicate(skipping, cpu_replicas(3));
    syncbn::parallel_apply(replicas, inputs, cpu_replicas(3));
    FAIL() << "expected a BarrierError";
  } catch (const syncbn::BarrierError& error) {
    EXPECT_NE(std::string(error.what()).find("copy 1 finished its forward"), std::string::npos) << error.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  Center healthy;
  auto replicas = syncbn::replicate(healthy, cpu_replicas(3));
  expect_close(torch::cat(syncbn::parallel_apply(replicas, inputs, cpu_replicas(3))), x - x.mean(0), "own barrier");
  ::unsetenv("SYNCBN_TIMEOUT");
}

TEST(DataParallel, NestedDataParallelIsRefused) {
  // The inner call's replicas would synchronize among themselves only: statistics of a slice, silently.
  struct OuterImpl : torch::nn::Cloneable<OuterImpl> {
    OuterImpl() { reset(); }
    void reset() override { bn = register_module("bn", syncbn::SyncBatchNorm1d(3)); }
    torch::Tensor forward(const torch::Tensor& x) { return syncbn::data_parallel(bn, x, cpu_replicas(2)); }
    syncbn::SyncBatchNorm1d bn{nullptr};
  };
  auto outer = std::make_shared<OuterImpl>();
  try {
    syncbn::data_parallel(outer, torch::randn({8, 3}), cpu_replicas(2));
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("inside a replica of another data_parallel"), std::string::npos)
        << error.what();
  }
  EXPECT_EQ(outer->bn->num_batches_tracked.item<int64_t>(), 0);
}

TEST(ParallelApply, RunsEveryReplicaOnItsOwnThread) {
  // Replicas that meet in a barrier deadlock unless they all run at once.
  syncbn::SyncBatchNorm1d bn(2);
  auto replicas = syncbn::replicate(bn, cpu_replicas(3));
  std::vector<torch::Tensor> inputs{torch::randn({2, 2}), torch::randn({3, 2}), torch::randn({1, 2})};
  auto outputs = syncbn::parallel_apply(replicas, inputs, cpu_replicas(3));
  ASSERT_EQ(outputs.size(), 3u);
  auto whole = torch::cat(inputs);
  auto expected = (whole - whole.mean(0)) / (whole.var(0, false) + 1e-5).sqrt();
  EXPECT_TRUE(torch::allclose(torch::cat(outputs), expected, 1e-5, 1e-5));
}

}  // namespace
