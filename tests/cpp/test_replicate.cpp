#include <gtest/gtest.h>

#include <mutex>

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

}  // namespace
