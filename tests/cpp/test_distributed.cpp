// Two processes synchronizing SyncBatchNorm2d through a c10d process group, from the LibTorch API.
//
// Run without arguments, this program is the test: it starts two copies of itself (ranks 0 and 1) sharing a
// FileStore, waits for them (bounded), and passes when both do. Each rank runs syncbn::data_parallel on 2 CPU
// replicas over its half of a global batch, with the layers' process group set, and compares with one
// torch::nn::BatchNorm2d on the whole global batch. Rank 1 starts its second step 3 s late, past the barrier's
// timeout (SYNCBN_TIMEOUT=2, set for both ranks) but within the group's (60 s): rank 0's replicas must wait for it,
// since a wait for other ranks is bounded by the group's timeout, not by the barrier's. Then an eval-mode forward
// with batch statistics on rank 0 alone, which must not wait for rank 1 (as torch.nn.SyncBatchNorm's). Then copies
// made on rank 0 alone (clone(), eval-mode data_parallel), also of a model whose layers sit in a block and a
// Sequential, a model dropped unused on both ranks and a used one deleted on rank 0 alone: none may change the
// number of a layer built later.
//
// The group's backend is gloo (c10d::ProcessGroupGloo, compiled into libtorch): torch's wheel ships its header
// but not gloo's own, which the build takes from the system (Debian: libgloo-dev; only pointers to gloo's types
// appear in ProcessGroupGloo's layout, so any gloo header version declares the same class).
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/torch.h>

#include <syncbn/syncbn.h>

#include "module_state.h"

extern char** environ;

namespace {

constexpr int kWorld = 2;

struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3).padding(1)));
    bn = register_module("bn", syncbn::SyncBatchNorm2d(torch::nn::BatchNormOptions(3).momentum(std::nullopt)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return bn->forward(conv->forward(x)); }
  torch::nn::Conv2d conv{nullptr};
  syncbn::SyncBatchNorm2d bn{nullptr};
};
TORCH_MODULE(Net);

// Synchronized layers one level down (a ResNet's sit in blocks): Net's clone() copy-assigns over the Block and the
// Sequential its reset() built, destroying the layers their constructors built without assigning over them.
struct BlockImpl : torch::nn::Cloneable<BlockImpl> {
  BlockImpl() { reset(); }
  void reset() override { bn = register_module("bn", syncbn::SyncBatchNorm2d(3)); }
  torch::Tensor forward(const torch::Tensor& x) { return bn->forward(x); }
  syncbn::SyncBatchNorm2d bn{nullptr};
};
TORCH_MODULE(Block);

struct DeepNetImpl : torch::nn::Cloneable<DeepNetImpl> {
  DeepNetImpl() { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3).padding(1)));
    block = register_module("block", Block());
    seq = register_module("seq", torch::nn::Sequential(syncbn::SyncBatchNorm2d(3)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return seq->forward(block->forward(conv->forward(x))); }
  syncbn::SyncBatchNorm2dImpl& seq_bn() { return *seq->ptr(0)->as<syncbn::SyncBatchNorm2dImpl>(); }
  torch::nn::Conv2d conv{nullptr};
  Block block{nullptr};
  torch::nn::Sequential seq{nullptr};
};
TORCH_MODULE(DeepNet);

double max_difference(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Net whose replicas sleep a second before their layers when their slice starts with 42 (one forward's, not others').
struct SleepyNetImpl : torch::nn::Cloneable<SleepyNetImpl> {
  SleepyNetImpl() { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3).padding(1)));
    bn = register_module("bn", syncbn::SyncBatchNorm2d(torch::nn::BatchNormOptions(3).momentum(std::nullopt)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    if (x.size(1) == 2 && x[0][0][0][0].item<double>() == 42) std::this_thread::sleep_for(std::chrono::seconds(1));
    return bn->forward(conv->forward(x));
  }
  torch::nn::Conv2d conv{nullptr};
  syncbn::SyncBatchNorm2d bn{nullptr};
};
TORCH_MODULE(SleepyNet);

// After a step whose forward rank 1 failed before its first synchronized call (its conv refusing 5 channels) and
// one more together: whether this rank's `failure` says so (rank 0: the BarrierError naming rank 1) and the ranks
// paired again (`bn` counted `count` batches, its running mean the same on both ranks).
bool failed_forward_told(int rank, const std::string& failure, const syncbn::SyncBatchNorm2dImpl& bn, int64_t count,
                         const c10::intrusive_ptr<c10d::ProcessGroup>& group, const char* what) {
  std::vector<at::Tensor> summed{bn.running_mean.clone()};
  group->allreduce(summed)->wait();
  const std::string said =
      rank == 1 ? "expected input" : "rank(s) 1 raised in their forward before its first synchronized call";
  const bool told = failure.find(said) != std::string::npos && bn.num_batches_tracked.item<int64_t>() == count &&
                    max_difference(summed[0], 2 * bn.running_mean) < 1e-12;
  if (!told) std::fprintf(stderr, "rank %d: %s not told: %s\n", rank, what, failure.c_str());
  return told;
}

// One rank: returns 0 when everything matches the whole-batch reference.
int run_rank(int rank, const std::string& store_path) {
  auto store = c10::make_intrusive<c10d::FileStore>(store_path, kWorld);
  store->setTimeout(std::chrono::seconds(60));
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, kWorld, options);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, kWorld);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);

  torch::manual_seed(0);
  Net net;
  net->to(torch::kDouble);
  net->bn->set_process_group(group);
  torch::nn::Conv2d ref_conv(torch::nn::Conv2dOptions(2, 3, 3).padding(1));
  torch::nn::BatchNorm2d ref_bn(torch::nn::BatchNormOptions(3).momentum(std::nullopt));
  ref_conv->to(torch::kDouble);
  ref_bn->to(torch::kDouble);
  syncbn_test::copy_state(*net->conv, *ref_conv);

  const std::vector<int64_t> sizes{3, 5};  // uneven slices of the global batch
  double error = 0;
  const std::string before = syncbn::cross_process_transport(group);
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(100 + step);
    auto x = torch::randn({8, 2, 4, 4}, torch::kDouble) * 2 + 1;
    auto grad = torch::randn({8, 3, 4, 4}, torch::kDouble);
    const int64_t begin = rank == 0 ? 0 : sizes[0];
    if (rank == 1 && step == 1) std::this_thread::sleep_for(std::chrono::seconds(3));
    auto x_mine = x.slice(0, begin, begin + sizes[rank]).clone().requires_grad_();
    net->zero_grad();
    ref_conv->zero_grad();
    ref_bn->zero_grad();
    auto y = syncbn::data_parallel(net, x_mine, std::vector<torch::Device>(2, torch::kCPU));
    y.backward(grad.slice(0, begin, begin + sizes[rank]));
    auto x_ref = x.clone().requires_grad_();
    auto y_ref = ref_bn->forward(ref_conv->forward(x_ref));
    y_ref.backward(grad);
    error = std::max(error, max_difference(y, y_ref.slice(0, begin, begin + sizes[rank])));
    error = std::max(error, max_difference(x_mine.grad(), x_ref.grad().slice(0, begin, begin + sizes[rank])));
    // Parameter gradients summed over the ranks are the global batch's.
    std::vector<at::Tensor> summed{net->bn->weight.grad().clone()};
    group->allreduce(summed)->wait();
    error = std::max(error, max_difference(summed[0], ref_bn->weight.grad()));
    error = std::max(error, max_difference(net->bn->running_var, ref_bn->running_var));
  }
  const bool counted = net->bn->num_batches_tracked.item<int64_t>() == 3;

  // Batch statistics in eval mode (track_running_stats=false) stay within the process, as torch.nn.SyncBatchNorm's
  // do: rank 0 evaluates alone (its 2 replicas on its own batch) while rank 1 waits at the group's barrier; then
  // a training forward together, the ranks still in step.
  const auto replicas = std::vector<torch::Device>(2, torch::kCPU);
  syncbn::SyncBatchNorm2d untracked(torch::nn::BatchNormOptions(3).track_running_stats(false));
  torch::nn::BatchNorm2d untracked_ref(torch::nn::BatchNormOptions(3).track_running_stats(false));
  untracked->to(torch::kDouble);
  untracked_ref->to(torch::kDouble);
  untracked->set_process_group(group);
  torch::manual_seed(200);
  const auto x_global = torch::randn({8, 3, 4, 4}, torch::kDouble) * 2 + 1;
  const auto x_rank = x_global.slice(0, rank == 0 ? 0 : sizes[0], rank == 0 ? sizes[0] : 8);
  if (rank == 0) {
    torch::NoGradGuard no_grad;
    untracked->eval();
    untracked_ref->eval();
    error = std::max(error, max_difference(syncbn::data_parallel(untracked, x_rank, replicas),
                                           untracked_ref->forward(x_rank)));
    untracked->train();
    untracked_ref->train();
  }
  group->barrier()->wait();
  {
    torch::NoGradGuard no_grad;
    const auto y_global = untracked_ref->forward(x_global);
    error = std::max(error, max_difference(syncbn::data_parallel(untracked, x_rank, replicas),
                                           y_global.slice(0, rank == 0 ? 0 : sizes[0], rank == 0 ? sizes[0] : 8)));
  }
  // Copies made on rank 0 only (an EMA model, an eval-mode validation's clones) keep their layers' numbers: a
  // layer both ranks build afterwards has one number on both, and they synchronize (a BarrierError otherwise).
  std::shared_ptr<torch::nn::Module> ema;
  if (rank == 0) {
    ema = net->clone();
    torch::NoGradGuard no_grad;
    net->eval();
    syncbn::data_parallel(net, torch::randn({4, 2, 4, 4}, torch::kDouble), replicas);
    net->train();
  }
  Net late;
  late->to(torch::kDouble);
  late->bn->set_process_group(group);
  syncbn::data_parallel(late, torch::randn({4, 2, 4, 4}, torch::kDouble), replicas);

  // The same with layers one level down, whose clone()s used to leak the numbers of the layers they built; a
  // model built and dropped unused on every rank gives its numbers back on every rank; a used one deleted on
  // rank 0 alone gives nothing back. A layer built afterwards still has one number on both ranks.
  {
    DeepNet deep;
    deep->to(torch::kDouble);
    if (rank == 0) {
      auto ema = std::dynamic_pointer_cast<DeepNetImpl>(deep->clone());
      auto ema_of_ema = ema->clone();
      torch::NoGradGuard no_grad;
      deep->eval();
      syncbn::data_parallel(deep, torch::randn({4, 2, 4, 4}, torch::kDouble), replicas);
      deep->train();
    }
  }
  if (rank == 0) late = Net(nullptr);
  DeepNet deep_late;
  deep_late->to(torch::kDouble);
  const bool every_layer_given_the_group = syncbn::set_process_group(*deep_late, group) == 2;  // block.bn, seq.0
  for (int step = 0; step < 2; ++step) {  // training data_parallel clones too, at every step
    syncbn::data_parallel(deep_late, torch::randn({4, 2, 4, 4}, torch::kDouble), replicas);
  }

  // A layer alone in its process whose input rank 1 refuses (4-D to a 1-D layer; no channels): every rank fails that
  // call (rank 0 with a BarrierError naming rank 1), and the next call pairs (before, rank 0 merged with rank 1's
  // next call, silently).
  bool refusal_announced = true;
  const std::vector<std::pair<torch::Tensor, std::string>> refused_inputs = {
      {torch::zeros({2, 3, 2, 2}, torch::kDouble), "expected 2D or 3D input"},
      {torch::zeros({2, 0}, torch::kDouble), "index 0 out of range"},
  };
  for (const auto& [refused_input, refusal] : refused_inputs) {
    syncbn::SyncBatchNorm1d lone(torch::nn::BatchNormOptions(3).momentum(std::nullopt));
    lone->to(torch::kDouble);
    lone->set_process_group(group);
    const auto good = torch::full({2, 3}, static_cast<double>(rank), torch::kDouble) + torch::arange(2).unsqueeze(1);
    std::string zero_error;
    try {
      lone->forward(rank == 1 ? refused_input : good);
    } catch (const std::exception& refused) {
      zero_error = refused.what();
    }
    lone->forward(good);  // ranks 0 and 1: means 0.5 and 1.5, so the global mean is 1
    const bool named = rank == 1 ? zero_error.find(refusal) != std::string::npos
                                 : zero_error.find("rank(s) 1 raised in this call") != std::string::npos;
    const bool announced = named && std::abs(lone->running_mean[0].item<double>() - 1.0) < 1e-12 &&
                           lone->num_batches_tracked.item<int64_t>() == 1;
    if (!announced) std::fprintf(stderr, "rank %d: refusal not announced: %s\n", rank, zero_error.c_str());
    refusal_announced = refusal_announced && announced;
  }

  // data_parallel on 2 replicas whose forward rank 1 fails before its first synchronized call (its conv refuses
  // the input: 5 channels): rank 1 tells rank 0, which fails its first call of that step with a BarrierError naming
  // rank 1, and the next step pairs (before, rank 0's call paired with rank 1's next forward: one step apart).
  const auto error_of = [&](auto& net, const torch::Tensor& x) -> std::string {  // a data_parallel's, if any
    try {
      syncbn::data_parallel(net, x, replicas);
    } catch (const std::exception& failed) {
      return failed.what();
    }
    return "";
  };
  const auto refused = torch::zeros({4, 5, 4, 4}, torch::kDouble);  // the conv's input has 2 channels
  bool failed_forward_announced = false;
  {
    Net failing;
    failing->to(torch::kDouble);
    failing->bn->set_process_group(group);
    const auto good = torch::randn({4, 2, 4, 4}, torch::kDouble) + rank;
    const std::string failure = error_of(failing, rank == 1 ? refused : good);
    syncbn::data_parallel(failing, good, replicas);
    failed_forward_announced = failed_forward_told(rank, failure, *failing->bn, 1, group, "failed forward");
  }

  // The same where rank 1's failing forward (thread B) waited for another thread's (A, slow before its layers) of
  // the same module: training forwards run one after another, and B counts calls from then on, so it tells (before,
  // it counted A's calls as its own and told nothing). Rank 0 runs two forwards; then both ranks one more.
  bool queued_failure_announced = false;
  {
    SleepyNet sleepy;
    sleepy->to(torch::kDouble);
    sleepy->bn->set_process_group(group);
    const auto good = torch::randn({4, 2, 4, 4}, torch::kDouble) + rank;
    std::string second;
    if (rank == 1) {
      auto slow = good.clone();
      slow.select(0, 0).fill_(42);
      slow.select(0, 2).fill_(42);  // both replicas' slices start with 42
      std::thread a([&] { syncbn::data_parallel(sleepy, slow, replicas); });
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      second = error_of(sleepy, refused);
      a.join();
    } else {
      syncbn::data_parallel(sleepy, good, replicas);
      second = error_of(sleepy, good);
    }
    syncbn::data_parallel(sleepy, good, replicas);
    queued_failure_announced = failed_forward_told(rank, second, *sleepy->bn, 2, group, "queued failed forward");
  }

  // A module whose layers exchange on two groups (here over the same ranks): rank 1's data_parallel failing before
  // its first synchronized call tells both at once; rank 0 fails at its first call (on `group`) and tells `second`,
  // on which it made none; the next step pairs on both (before, nothing was told: rank 0 waited on `group` for
  // rank 1's next forward, which waited on... one step apart, or stuck until the timeout).
  bool several_groups_told = true;
  {
    auto second_store = c10::make_intrusive<c10d::PrefixStore>("second", store);
    auto second_gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(second_store, rank, kWorld, options);
    auto second = c10::make_intrusive<c10d::ProcessGroup>(second_store, rank, kWorld);
    second->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, second_gloo);
    second->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    DeepNet two_groups;
    two_groups->to(torch::kDouble);
    two_groups->block->bn->set_process_group(group);
    two_groups->seq_bn().set_process_group(second);
    const auto good = torch::randn({4, 2, 4, 4}, torch::kDouble) + rank;
    const std::string failure = error_of(two_groups, rank == 1 ? refused : good);
    syncbn::data_parallel(two_groups, good, replicas);
    several_groups_told = failed_forward_told(rank, failure, *two_groups->block->bn, 1, group, "two groups") &&
                          failed_forward_told(rank, failure, two_groups->seq_bn(), 1, second, "second group");
  }

  // A subgroup's ranks as the user knows them (set_global_ranks; here this group's ranks 0, 1 as 5, 9): its errors
  // list the group's own numbers and say which global ranks they are. Bad mappings are refused.
  bool global_ranks_named = true;
  for (const std::vector<int64_t>& bad : {std::vector<int64_t>{5}, std::vector<int64_t>{5, 5}}) {
    try {
      syncbn::set_global_ranks(group, bad);
      global_ranks_named = false;
    } catch (const c10::ValueError& refused) {
      global_ranks_named = global_ranks_named && std::string(refused.what()).find("set_global_ranks") == 0;
    }
  }
  syncbn::set_global_ranks(group, {5, 9});
  // Also: a layer given its group by set_process_group(model, group) is named by its place in the model.
  {
    torch::nn::Sequential lone(torch::nn::Identity(), syncbn::SyncBatchNorm1d(3));
    syncbn::set_process_group(*lone, group);
    std::string failure;
    try {
      lone->forward(rank == 1 ? torch::zeros({2, 3, 2, 2}) : torch::zeros({2, 3}));
    } catch (const std::exception& failed) {
      failure = failed.what();
    }
    const std::string said = rank == 1 ? "expected 2D or 3D input" : "rank(s) 1 raised in this call";
    const std::string mapped =
        "the group's ranks 0..1 are global ranks 5, 9 (this process: global rank " + std::to_string(rank ? 9 : 5) + ")";
    const std::string place = "synchronized BatchNorm '1': syncbn::SyncBatchNorm #";
    if (failure.find(said) == std::string::npos ||
        (rank == 0 && (failure.find(mapped) == std::string::npos || failure.find(place) == std::string::npos))) {
      std::fprintf(stderr, "rank %d: global ranks or place not named: %s\n", rank, failure.c_str());
      global_ranks_named = false;
    }
  }
  syncbn::set_global_ranks(group, {0, 1});  // the group's own numbers: nothing to add

  // Both ranks on this host: shared memory, unless SYNCBN_SHARED_MEMORY=0 (the test's second run) keeps every
  // exchange on the group's backend.
  const char* shared_memory = std::getenv("SYNCBN_SHARED_MEMORY");
  const std::string expected = shared_memory && std::string(shared_memory) == "0" ? "process group" : "shared memory";
  const std::string transport = syncbn::cross_process_transport(group);
  std::printf("rank %d (%s, exchanging through %s, '%s' before the first call): largest difference %.3g, "
              "num_batches_tracked %s\n",
              rank, group->getBackendName().c_str(), transport.c_str(), before.c_str(), error, counted ? "3" : "wrong");
  return error < 1e-12 && counted && refusal_announced && failed_forward_announced && queued_failure_announced &&
                 global_ranks_named && several_groups_told && every_layer_given_the_group &&
                 before == "not yet" && transport == expected
             ? 0
             : 1;
}

// Starts ranks 0 and 1 of this program and waits for both, killing them past the time limit.
int run_test(const char* self) {
  const auto store = std::filesystem::temp_directory_path() / ("syncbn_store_" + std::to_string(::getpid()));
  std::filesystem::remove(store);
  ::setenv("SYNCBN_TIMEOUT", "2", 1);  // the ranks' barrier timeout: shorter than rank 1's delay
  std::vector<pid_t> children;
  for (int rank = 0; rank < kWorld; ++rank) {
    std::string rank_text = std::to_string(rank), store_text = store.string();
    std::vector<char*> argv{const_cast<char*>(self), const_cast<char*>("--rank"), rank_text.data(),
                            const_cast<char*>("--store"), store_text.data(), nullptr};
    pid_t pid = 0;
    if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0) {
      std::perror("posix_spawn");
      for (pid_t started : children) {  // it would wait for its peer in the store
        ::kill(started, SIGKILL);
        ::waitpid(started, nullptr, 0);
      }
      return 1;
    }
    children.push_back(pid);
  }
  int failures = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  for (pid_t child : children) {
    int status = 0;
    while (::waitpid(child, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        for (pid_t other : children) ::kill(other, SIGKILL);
        ::waitpid(child, &status, 0);
        std::cerr << "a rank did not finish within 120 s\n";
        failures = 1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failures = 1;
  }
  std::filesystem::remove(store);
  std::cout << (failures ? "FAILED" : "PASSED") << ": 2 processes (gloo) x 2 CPU replicas vs torch::nn::BatchNorm2d\n";
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "--rank" && std::string(argv[3]) == "--store") {
    try {
      return run_rank(std::stoi(argv[2]), argv[4]);
    } catch (const std::exception& error) {
      std::cerr << "rank " << argv[2] << ": " << error.what() << "\n";
      return 1;
    }
  }
  return run_test(argv[0]);
}
