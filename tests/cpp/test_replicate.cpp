#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

namespace {

// Records the hooks it receives, in a log shared by all replicas.
struct CallLog {
  std::mutex mutex;
  std::vector<std::pair<std::string, int64_t>> calls;  // (module name, copy id)
  std::vector<syncbn::CallbackContext*> contexts;
};

struct HookedImpl : torch::nn::Module, syncbn::ReplicationCallback {
  HookedImpl(std::string tag, std::shared_ptr<CallLog> log) : tag_(std::move(tag)), log_(std::move(log)) {}
  torch::Tensor forward(torch::Tensor input) { return input; }
  void on_replicate(syncbn::CallbackContext& context, int64_t copy_id) override {
    std::lock_guard<std::mutex> lock(log_->mutex);
    log_->calls.emplace_back(tag_, copy_id);
    log_->contexts.push_back(&context);
    if (copy_id == 0) {
      context.set<std::string>("owner", tag_);
    } else {
      // The master of this position ran first and left its state here.
      EXPECT_EQ(context.get<std::string>("owner"), tag_);
    }
  }
  std::string tag_;
  std::shared_ptr<CallLog> log_;
};

torch::nn::Sequential make_net(const std::shared_ptr<CallLog>& log) {
  torch::nn::Sequential net(torch::nn::Linear(2, 2));
  net->push_back("a", std::make_shared<HookedImpl>("a", log));
  net->push_back(torch::nn::ReLU());
  net->push_back("b", std::make_shared<HookedImpl>("b", log));
  return net;
}

TEST(ExecuteReplicationCallbacks, MasterFirstAndOneContextPerPosition) {
  auto log = std::make_shared<CallLog>();
  std::vector<std::shared_ptr<torch::nn::Module>> replicas;
  for (int i = 0; i < 3; ++i) replicas.push_back(make_net(log).ptr());
  auto contexts = syncbn::execute_replication_callbacks(replicas);
  // Sequential + Linear + a + ReLU + b.
  ASSERT_EQ(contexts.size(), 5u);
  ASSERT_EQ(log->calls.size(), 6u);
  // Every copy of a position saw the same context; different positions, different ones.
  for (size_t i = 0; i < log->calls.size(); ++i) {
    for (size_t j = 0; j < log->calls.size(); ++j) {
      const bool same_position = log->calls[i].first == log->calls[j].first;
      EXPECT_EQ(log->contexts[i] == log->contexts[j], same_position);
    }
  }
  // Copy 0 came before any other copy at each position.
  for (const char* tag : {"a", "b"}) {
    std::vector<int64_t> order;
    for (const auto& call : log->calls) {
      if (call.first == tag) order.push_back(call.second);
    }
    EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2})) << tag;
  }
  EXPECT_EQ(contexts[2].get(), log->contexts[0]);  // position 2 is "a"
}

TEST(ExecuteReplicationCallbacks, NonIsomorphicReplicasNameThePositionAndTypes) {
  auto log = std::make_shared<CallLog>();
  torch::nn::Sequential other(torch::nn::Linear(2, 2), torch::nn::Tanh());
  std::vector<std::shared_ptr<torch::nn::Module>> replicas{make_net(log).ptr(), other.ptr()};
  try {
    syncbn::execute_replication_callbacks(replicas);
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("position 2"), std::string::npos) << message;
    EXPECT_NE(message.find("HookedImpl"), std::string::npos) << message;
    EXPECT_NE(message.find("TanhImpl"), std::string::npos) << message;
  }
  EXPECT_TRUE(log->calls.empty()) << "no hook may run before the replicas are checked";
}

TEST(ExecuteReplicationCallbacks, DifferentModuleCountsAreAnError) {
  std::vector<std::vector<syncbn::ReplicaModule>> replicas{
      {{"Net", {}}, {"Linear", {}}},
      {{"Net", {}}},
  };
  EXPECT_THROW(syncbn::execute_replication_callbacks(replicas), c10::ValueError);
  EXPECT_THROW(syncbn::execute_replication_callbacks(std::vector<std::vector<syncbn::ReplicaModule>>{}),
               c10::ValueError);
}


// Which of two leaves autograd hands its gradient first, in one backward.
struct GradientOrder {
  std::vector<std::string> order;
  void watch(const at::Tensor& leaf, const std::string& name) {
    leaf.register_hook([this, name](const at::Tensor& grad) {
      order.push_back(name);
      return grad;
    });
  }
};

at::Tensor long_chain(at::Tensor h) {
  for (int i = 0; i < 12; ++i) h = torch::tanh(h * 1.1);
  return h;
}

TEST(ParameterAlias, SharesTheDataAndHandsTheGradientOnAsSoonAsItIsComplete) {
  at::Tensor parameter = torch::randn({4}, torch::requires_grad());
  at::Tensor x = torch::randn({4}, torch::requires_grad());
  at::Tensor alias = syncbn::parameter_alias(parameter);
  EXPECT_EQ(alias.data_ptr(), parameter.data_ptr());
  GradientOrder watched;
  watched.watch(parameter, "parameter");
  watched.watch(x, "input");
  (long_chain(x) * alias).sum().backward();
  EXPECT_EQ(watched.order, (std::vector<std::string>{"parameter", "input"}));
  ASSERT_TRUE(parameter.grad().defined());
  EXPECT_TRUE(torch::allclose(parameter.grad(), long_chain(x.detach())));

  // The reason: a view made before the forward is reached only once nothing newer is ready, at the end.
  parameter.mutable_grad() = at::Tensor();
  GradientOrder viewed;
  viewed.watch(parameter, "parameter");
  viewed.watch(x, "input");
  at::Tensor view = parameter.view_as(parameter);
  (long_chain(x) * view).sum().backward();
  EXPECT_EQ(viewed.order, (std::vector<std::string>{"input", "parameter"}));

  at::Tensor frozen = torch::randn({2});
  EXPECT_FALSE(syncbn::parameter_alias(frozen).requires_grad());
}

TEST(ParameterAliases, SumTheReplicasGradientsInReplicaOrderWhicheverOrderTheBackwardRunsThem) {
  // Float32 makes the order visible: (1e8 + 1) - 1e8 == 0, but (1e8 - 1e8) + 1 == 1. Each alias gave its gradient
  // to the parameter's AccumulateGrad directly, where autograd summed them in the order it ran their nodes.
  const std::vector<float> contributions{1e8f, 1.0f, -1e8f};
  for (const std::vector<int> backward_order : {std::vector<int>{0, 1, 2}, {0, 2, 1}, {2, 1, 0}, {1, 2, 0}}) {
    at::Tensor parameter = torch::ones({1}, torch::requires_grad());
    auto aliases = syncbn::parameter_aliases(parameter, 3);
    ASSERT_EQ(aliases.size(), 3u);
    std::vector<at::Tensor> losses;
    for (int replica : backward_order) {
      EXPECT_EQ(aliases[replica].data_ptr(), parameter.data_ptr());
      losses.push_back((aliases[replica] * contributions[replica]).sum());
    }
    torch::autograd::backward(losses);
    ASSERT_TRUE(parameter.grad().defined());
    EXPECT_EQ(parameter.grad().item<float>(), 0.0f) << "replicas' gradients summed out of replica order";
  }
  // A sparse gradient from replica 0, a dense one from replica 1 (an nn.Embedding(sparse=True) whose weight is used
  // otherwise too): ATen adds them only as dense + sparse.
  at::Tensor table = torch::ones({4, 2}, torch::requires_grad());
  auto tables = syncbn::parameter_aliases(table, 2);
  at::Tensor looked_up = torch::embedding(tables[0], torch::tensor({1}), -1, false, /*sparse=*/true).sum();
  torch::autograd::backward({looked_up, tables[1].sum()});
  at::Tensor expected = torch::ones({4, 2});
  expected[1] += 1;
  EXPECT_TRUE(torch::equal(table.grad().to_dense(), expected)) << table.grad();

  at::Tensor frozen = torch::randn({2});
  for (const auto& alias : syncbn::parameter_aliases(frozen, 2)) EXPECT_FALSE(alias.requires_grad());
  EXPECT_THROW(syncbn::parameter_aliases(frozen, 0), c10::ValueError);
}

TEST(Replicate, TheReplicasGradientsReachTheOriginalAsSoonAsEveryReplicaGaveIts) {
  torch::manual_seed(0);
  torch::nn::Linear linear(4, 3);
  auto replicas = syncbn::replicate(linear, {torch::kCPU, torch::kCPU});
  at::Tensor x = torch::randn({6, 4}, torch::requires_grad());
  GradientOrder watched;
  watched.watch(linear->weight, "weight");
  watched.watch(x, "input");
  at::Tensor loss = replicas[0]->forward(long_chain(x.slice(0, 0, 3))).sum() +
                    replicas[1]->forward(long_chain(x.slice(0, 3, 6))).sum();
  loss.backward();
  EXPECT_EQ(watched.order, (std::vector<std::string>{"weight", "input"}));
  at::Tensor expected = long_chain(x.detach()).sum(0).expand({3, 4});
  EXPECT_TRUE(torch::allclose(linear->weight.grad(), expected));
}

struct ClonableBaseImpl : torch::nn::Cloneable<ClonableBaseImpl> {
  ClonableBaseImpl() { reset(); }
  void reset() override { bn = register_module("bn", syncbn::SyncBatchNorm1d(3)); }
  torch::Tensor forward(const torch::Tensor& x) { return bn->forward(x); }
  syncbn::SyncBatchNorm1d bn{nullptr};
};
struct DerivedFromClonableImpl : ClonableBaseImpl {  // its clone() returns a ClonableBaseImpl
  torch::Tensor forward(const torch::Tensor& x) { return ClonableBaseImpl::forward(x) * 2; }
};

TEST(Replicate, ACloneOfAnotherTypeIsRefusedNotReturnedAsNull) {
  auto module = std::make_shared<DerivedFromClonableImpl>();
  try {
    syncbn::replicate(module, std::vector<torch::Device>(2, torch::kCPU));
    FAIL() << "replicate returned replicas it could not cast";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("clone() of the module returned a module of another type"),
              std::string::npos)
        << error.what();
  }
}

TEST(Replicate, ReplicasServeOneForwardAndSaySoWhenUsedAgain) {
  syncbn::SyncBatchNorm1d bn(3);
  auto replicas = syncbn::replicate(bn, std::vector<torch::Device>(2, torch::kCPU));
  std::vector<torch::Tensor> inputs{torch::randn({2, 3}), torch::randn({3, 3})};
  syncbn::parallel_apply(replicas, inputs);
  try {
    syncbn::parallel_apply(replicas, inputs);
    FAIL() << "a second forward of the replicas ran";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("replicas from syncbn::replicate serve one forward"), std::string::npos)
        << error.what();
  }
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
  // Replicating again works.
  auto again = syncbn::replicate(bn, std::vector<torch::Device>(2, torch::kCPU));
  syncbn::parallel_apply(again, inputs);
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 2);
}

TEST(Replicate, ACloneOfAReplicaIsAnUnreplicatedLayer) {
  // It used to keep the replica's end of the barrier, and waited there for the other copy until the timeout.
  torch::manual_seed(0);
  ::setenv("SYNCBN_TIMEOUT", "1", 1);  // the replication's barrier: without the fix, fail in 1 s, not 300
  syncbn::SyncBatchNorm1d bn(3);
  auto replicas = syncbn::replicate(bn, std::vector<torch::Device>(2, torch::kCPU));
  ::unsetenv("SYNCBN_TIMEOUT");
  const auto x = torch::randn({5, 3});
  for (const auto& replica : replicas) {
    auto alone = std::dynamic_pointer_cast<syncbn::SyncBatchNorm1dImpl>(replica->clone());
    ASSERT_NE(alone, nullptr);
    const auto start = std::chrono::steady_clock::now();
    const auto y = alone->forward(x);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
    EXPECT_TRUE(torch::allclose(y, (x - x.mean(0)) / (x.var(0, false) + 1e-5).sqrt(), 1e-5, 1e-5));
    EXPECT_EQ(alone->layer_id(), bn->layer_id());  // still the same layer across processes
  }
}


TEST(ReplicaGraph, ReachesTellsWhichTargetsABackwardFromTheStartsMeets) {
  at::Tensor leaf = torch::randn({3}, torch::requires_grad());
  at::Tensor past = leaf * 2;         // below the boundary: reached only without it
  at::Tensor boundary = past.exp();   // the walk stops at its node
  at::Tensor on_the_way = boundary.sin();
  at::Tensor start = on_the_way.cos();
  at::Tensor beside = boundary.tanh();  // another branch up from the boundary: never walked
  at::Tensor no_graph = torch::ones({3});
  EXPECT_EQ(syncbn::reaches({start}, {on_the_way, past, beside, at::Tensor(), no_graph, start}, {boundary}),
            (std::vector<bool>{true, false, false, false, false, true}));
  EXPECT_EQ(syncbn::reaches({start}, {past, beside}, {}), (std::vector<bool>{true, false}));
  EXPECT_EQ(syncbn::reaches({}, {on_the_way}, {}), (std::vector<bool>{false}));
}

}  // namespace

namespace {

std::shared_ptr<torch::nn::Module> linear_and_batch_norm(int64_t features) {
  return std::make_shared<torch::nn::SequentialImpl>(torch::nn::Linear(3, features), torch::nn::BatchNorm1d(features));
}

// The message of the c10::ValueError `replicate` throws (an empty string where it throws none, or another error).
template <typename Replicate>
std::string value_error_of(Replicate replicate) {
  try {
    replicate();
  } catch (const c10::ValueError& error) {
    return error.what_without_backtrace();
  }
  return "";
}

}  // namespace

TEST(CompleteReplication, RefusesNullOrMismatchedClonesBeforeLinkingAnything) {
  const auto original = linear_and_batch_norm(5);
  const auto clones = [](int64_t features) {
    return std::vector<std::shared_ptr<torch::nn::Module>>{linear_and_batch_norm(features),
                                                           linear_and_batch_norm(features)};
  };
  EXPECT_EQ(value_error_of([&] { syncbn::complete_replication(nullptr, clones(5)); }),
            "complete_replication: the original module is null");
  EXPECT_EQ(value_error_of([&] { syncbn::complete_replication(original, {linear_and_batch_norm(5), nullptr}); }),
            "complete_replication: clone 1 is null");
  EXPECT_EQ(value_error_of([&] { syncbn::IsolatedReplication(original, {nullptr}); }),
            "IsolatedReplication: clone 0 is null");
  EXPECT_EQ(value_error_of([&] { syncbn::complete_replication(original, clones(4)); }),
            "complete_replication: clone 0's parameter '0.weight' has shape [4, 3] but the original's has [5, 3]");
  const auto without_norm = std::make_shared<torch::nn::SequentialImpl>(torch::nn::Linear(3, 5));
  EXPECT_EQ(value_error_of([&] { syncbn::IsolatedReplication(original, {without_norm}); }),
            "IsolatedReplication: clone 0 has no submodule '1'; a clone must have the original's structure (clone() "
            "copies it)");
  // A buffer of another shape, the parameters alike: before, replica 0's buffer was made to view the original's
  // (complete_replication), or the original's resized to the clone's at write-back (IsolatedReplication).
  auto other_buffer = linear_and_batch_norm(5);
  other_buffer->named_children()["1"]->named_buffers(/*recurse=*/false)["running_mean"].set_(torch::zeros({4}));
  EXPECT_EQ(value_error_of([&] { syncbn::IsolatedReplication(original, {other_buffer}); }),
            "IsolatedReplication: clone 0's buffer '1.running_mean' has shape [4] but the original's has [5]");
  EXPECT_EQ(original->named_buffers()["1.running_mean"].sizes(), torch::IntArrayRef({5}));
  EXPECT_EQ(other_buffer->named_buffers()["1.running_mean"].sizes(), torch::IntArrayRef({4}));  // not linked
  // Matching clones still link (one context per module position: the Sequential, Linear, BatchNorm1d).
  EXPECT_EQ(syncbn::complete_replication(original, clones(5)).size(), 3u);
}

TEST(SlavePipe, WithoutABarrierIsRefused) {
  EXPECT_EQ(value_error_of([] { syncbn::SlavePipe(nullptr, 1, 0); }),
            "SlavePipe: no barrier (get a pipe from SyncMaster::register_slave)");
}
