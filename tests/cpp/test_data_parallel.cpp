#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "module_state.h"

namespace {

using syncbn_test::copy_state;

std::vector<torch::Device> cpu_replicas(int64_t n) { return std::vector<torch::Device>(n, torch::kCPU); }

void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  EXPECT_TRUE(torch::allclose(a, b, 1e-10, 1e-10)) << what << ": max difference " << (a - b).abs().max().item<double>();
}

// A synchronized layer and torch's, in float64, with the same random affine parameters.
std::pair<syncbn::SyncBatchNorm2d, torch::nn::BatchNorm2d> matching_layers(const torch::nn::BatchNormOptions& options) {
  syncbn::SyncBatchNorm2d synced(options);
  torch::nn::BatchNorm2d reference(options);
  synced->to(torch::kDouble);
  reference->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    synced->weight.uniform_(0.5, 1.5);
    synced->bias.uniform_(-0.5, 0.5);
  }
  copy_state(*synced, *reference);
  return {synced, reference};
}

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
  explicit FlakyNetImpl(bool c10_error = false) : c10_error(c10_error) { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 4, 3).padding(1)));
    bn = register_module("bn", syncbn::SyncBatchNorm2d(4));
  }
  torch::Tensor forward(const torch::Tensor& input) {
    if ((input == -1000).any().item<bool>()) {
      if (c10_error) TORCH_CHECK_VALUE(false, "marker found");
      throw std::out_of_range("marker found");
    }
    return bn->forward(conv->forward(input));
  }
  bool c10_error;
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
  FlakyNet c10_net(true);
  try {
    syncbn::data_parallel(c10_net, x, cpu_replicas(4));
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("in replica 2 on device cpu"), std::string::npos) << error.what();
  }
  auto y = syncbn::data_parallel(net, torch::randn({8, 2, 4, 4}), cpu_replicas(4));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{8, 4, 4, 4}));
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

struct RecordThreadsImpl : torch::nn::Cloneable<RecordThreadsImpl> {
  std::shared_ptr<std::vector<int>> seen = std::make_shared<std::vector<int>>();
  std::shared_ptr<std::mutex> mutex = std::make_shared<std::mutex>();
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) {
    std::lock_guard<std::mutex> lock(*mutex);
    seen->push_back(at::get_num_threads());
    return x * 2;
  }
};
TORCH_MODULE(RecordThreads);

TEST(ParallelApply, CpuReplicasComputeWithTheirShareOfTheIntraOpThreads) {
  // torch sizes a thread's OpenMP team at its first parallel op to the process-wide count: a replica thread must
  // not take that over its share, or the replicas oversubscribe the cores.
  const int saved = at::get_num_threads();
  for (auto [threads, replicas, share] : {std::tuple{4, 2, 2}, {2, 4, 1}, {3, 2, 1}, {2, 2, 1}}) {
    at::set_num_threads(threads);
    RecordThreads module;
    auto x = torch::randn({2 * replicas, 3});
    for (int step = 0; step < 2; ++step) syncbn::data_parallel(module, x, cpu_replicas(replicas));
    EXPECT_EQ(*module->seen, std::vector<int>(2 * replicas, share)) << threads << " threads, " << replicas << " replicas";
    EXPECT_EQ(at::get_num_threads(), threads) << "the caller's own count is left alone";
    int in_a_new_thread = 0;
    std::thread([&] { in_a_new_thread = at::get_num_threads(); }).join();
    EXPECT_EQ(in_a_new_thread, threads) << "and so is the count new threads start with";
  }
  at::set_num_threads(saved);
}

TEST(SyncBatchNormModule, SameStateAsTorchBatchNormAndSerializesBothWays) {
  syncbn::SyncBatchNorm3d synced(torch::nn::BatchNormOptions(5).affine(true));
  torch::nn::BatchNorm3d plain(5);
  std::vector<std::string> synced_names, plain_names;
  for (const auto& item : synced->named_parameters()) synced_names.push_back(item.key());
  for (const auto& item : synced->named_buffers()) synced_names.push_back(item.key());
  for (const auto& item : plain->named_parameters()) plain_names.push_back(item.key());
  for (const auto& item : plain->named_buffers()) plain_names.push_back(item.key());
  EXPECT_EQ(synced_names, plain_names);

  synced->forward(torch::randn({4, 5, 2, 2, 2}));  // moves the running statistics
  std::stringstream stream;
  torch::save(synced, stream);
  torch::load(plain, stream);
  EXPECT_TRUE(torch::equal(plain->running_mean, synced->running_mean));
  EXPECT_EQ(plain->num_batches_tracked.item<int64_t>(), 1);

  std::stringstream back;
  torch::save(plain, back);
  syncbn::SyncBatchNorm3d reloaded(5);
  torch::load(reloaded, back);
  EXPECT_TRUE(torch::equal(reloaded->running_var, synced->running_var));

  auto clone = std::dynamic_pointer_cast<syncbn::SyncBatchNorm3dImpl>(synced->clone());
  ASSERT_NE(clone, nullptr);
  EXPECT_TRUE(torch::equal(clone->running_mean, synced->running_mean));
  EXPECT_NE(clone->running_mean.data_ptr(), synced->running_mean.data_ptr());

  std::ostringstream printed;
  printed << *synced;
  EXPECT_NE(printed.str().find("syncbn::SyncBatchNorm3d(5, eps=1e-05, momentum=0.1, affine=true"), std::string::npos) << printed.str();
  EXPECT_THROW(synced->forward(torch::randn({4, 5})), c10::ValueError);
}

}  // namespace

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
