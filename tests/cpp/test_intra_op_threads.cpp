// CPU replicas compute with their share of the caller's intra-op threads, set for the replica threads only: the
// count other threads of the process start with stays torch's default.
#include <gtest/gtest.h>

#include <mutex>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "data_parallel_helpers.h"

using syncbn_test::cpu_replicas;

namespace {

int count_in_a_new_thread() {
  int count = 0;
  std::thread([&] { count = at::get_num_threads(); }).join();
  return count;
}

// Records the intra-op thread count a thread started during its forward gets.
struct StartsAThreadImpl : torch::nn::Cloneable<StartsAThreadImpl> {
  std::shared_ptr<std::vector<int>> seen = std::make_shared<std::vector<int>>();
  std::shared_ptr<std::mutex> mutex = std::make_shared<std::mutex>();
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) {
    const int count = count_in_a_new_thread();
    std::lock_guard<std::mutex> lock(*mutex);
    seen->push_back(count);
    return x;
  }
};
TORCH_MODULE(StartsAThread);

class IntraOpThreads : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_ = at::get_num_threads();
    at::set_num_threads(4);  // the process default: 4, shared as 2 per replica below
  }
  void TearDown() override { at::set_num_threads(saved_); }
  int saved_ = 1;
};

TEST_F(IntraOpThreads, ThreadsStartedDuringACallGetTheProcessDefaultNotTheReplicasShare) {
  StartsAThread module;
  for (int step = 0; step < 5; ++step) {
    syncbn::data_parallel(module, torch::randn({4, 3}), std::vector<torch::Device>(2, torch::kCPU));
  }
  EXPECT_EQ(*module->seen, std::vector<int>(10, 4));
  EXPECT_EQ(count_in_a_new_thread(), 4);
}

TEST_F(IntraOpThreads, SetThreadIntraOpThreadsSetsTheCallingThreadsCountOnly) {
  // What the Python replica workers call (syncbn_ext._C.set_thread_intra_op_threads).
  if (!syncbn::thread_intra_op_threads_supported()) {
    EXPECT_FALSE(syncbn::set_thread_intra_op_threads(1));
    GTEST_SKIP() << "torch without OpenMP";
  }
  int own = 0, started_meanwhile = 0;
  std::thread worker([&] {
    EXPECT_TRUE(syncbn::set_thread_intra_op_threads(1));
    started_meanwhile = count_in_a_new_thread();
    torch::randn({64, 64}).matmul(torch::randn({64, 64}));  // a parallel op: the count stays the thread's own
    own = at::get_num_threads();
  });
  worker.join();
  EXPECT_EQ(own, 1);
  EXPECT_EQ(started_meanwhile, 4);
  EXPECT_EQ(count_in_a_new_thread(), 4);
  EXPECT_EQ(at::get_num_threads(), 4);
  EXPECT_THROW(syncbn::set_thread_intra_op_threads(0), c10::ValueError);
}

TEST_F(IntraOpThreads, ACallerWithACountOfItsOwnLeavesTheProcessDefaultAlone) {
  // A caller whose own count differs from the default (1 here) used to make its count the process default, for
  // good, when it restored "the caller's count" after its replicas set theirs.
  if (!syncbn::thread_intra_op_threads_supported()) GTEST_SKIP() << "torch without OpenMP";
  syncbn::SyncBatchNorm1d bn(3);
  std::thread caller([&] {
    syncbn::set_thread_intra_op_threads(1);  // this thread's own count only
    syncbn::data_parallel(bn, torch::randn({4, 3}), std::vector<torch::Device>(2, torch::kCPU));
    EXPECT_EQ(at::get_num_threads(), 1) << "the caller's own count is left alone";
  });
  caller.join();
  EXPECT_EQ(count_in_a_new_thread(), 4);
  EXPECT_EQ(at::get_num_threads(), 4);
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

}  // namespace
