// Layer numbers identify a synchronized layer across processes (construction order): copies made on one rank
// only (an EMA model, clone(), an eval-mode data_parallel) must not shift the numbers of layers built later, and
// neither must the layers clone() builds and drops along the way, however deep they sit.
//
// Numbers are process-wide and every test's unused layers give theirs back: the tests compare with the numbers
// the next layers would take (upcoming_layer_numbers), never with fixed ones.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

namespace {

// Builds its layer in reset(), which Cloneable::clone() calls on the copy before assigning the original's over it.
struct NumberedNetImpl : torch::nn::Cloneable<NumberedNetImpl> {
  NumberedNetImpl() { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(3, 3, 1));
    bn = register_module("bn", syncbn::SyncBatchNorm2d(3));
    head = register_module("head", syncbn::SyncBatchNorm2d(3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head->forward(bn->forward(conv->forward(x))); }
  torch::nn::Conv2d conv{nullptr};
  syncbn::SyncBatchNorm2d bn{nullptr}, head{nullptr};
};
TORCH_MODULE(NumberedNet);

struct NumberedBlockImpl : torch::nn::Cloneable<NumberedBlockImpl> {
  NumberedBlockImpl() { reset(); }
  void reset() override { bn = register_module("bn", syncbn::SyncBatchNorm2d(3)); }
  torch::Tensor forward(const torch::Tensor& x) { return bn->forward(x); }
  syncbn::SyncBatchNorm2d bn{nullptr};
};
TORCH_MODULE(NumberedBlock);

// Its layers one level down (a ResNet's are in blocks): clone() builds a Block and a Sequential in this reset(),
// then copy-assigns the originals' clones over them, so the layers their constructors built are destroyed without
// ever being assigned over.
struct NestedNetImpl : torch::nn::Cloneable<NestedNetImpl> {
  NestedNetImpl() { reset(); }
  void reset() override {
    block = register_module("block", NumberedBlock());
    seq = register_module("seq", torch::nn::Sequential(syncbn::SyncBatchNorm2d(3), torch::nn::ReLU()));
  }
  torch::Tensor forward(const torch::Tensor& x) { return seq->forward(block->forward(x)); }
  int64_t block_number() const { return block->bn->layer_id(); }
  int64_t seq_number() const { return seq->ptr(0)->as<syncbn::SyncBatchNorm2dImpl>()->layer_id(); }
  NumberedBlock block{nullptr};
  torch::nn::Sequential seq{nullptr};
};
TORCH_MODULE(NestedNet);

// The numbers the next `count` layers would take: built, read, and dropped unused (which gives them back).
std::vector<int64_t> upcoming_layer_numbers(int count) {
  std::vector<syncbn::SyncBatchNorm2d> layers;
  std::vector<int64_t> numbers;
  for (int i = 0; i < count; ++i) {
    layers.emplace_back(1);
    numbers.push_back(layers.back()->layer_id());
  }
  return numbers;
}

int64_t next_layer_number() { return upcoming_layer_numbers(1)[0]; }

const auto kTwoReplicas = std::vector<torch::Device>(2, torch::kCPU);

// An eval-mode data_parallel (it clones): e.g. a validation on rank 0 only.
void validate(const std::shared_ptr<torch::nn::Module>& module, const std::function<void()>& run) {
  torch::NoGradGuard no_grad;
  module->eval();
  run();
  module->train();
}

TEST(LayerNumbers, AreTakenInConstructionOrder) {
  const auto expected = upcoming_layer_numbers(2);
  EXPECT_LT(expected[0], expected[1]);
  syncbn::SyncBatchNorm2d a(3);
  syncbn::SyncBatchNorm1d b(3);
  EXPECT_EQ(a->layer_id(), expected[0]);
  EXPECT_EQ(b->layer_id(), expected[1]);
}

TEST(LayerNumbers, ACloneKeepsTheOriginalsNumbersAndShiftsNoLaterLayer) {
  NumberedNet net;
  const auto after_net = upcoming_layer_numbers(2);
  auto ema = std::dynamic_pointer_cast<NumberedNetImpl>(net->clone());  // e.g. on rank 0 only
  ASSERT_NE(ema, nullptr);
  EXPECT_EQ(ema->bn->layer_id(), net->bn->layer_id());
  EXPECT_EQ(ema->head->layer_id(), net->head->layer_id());
  // The layers clone()'s reset() built (and that it overwrote) gave their numbers back.
  syncbn::SyncBatchNorm2d later(3), later_still(3);
  EXPECT_EQ(later->layer_id(), after_net[0]);
  EXPECT_EQ(later_still->layer_id(), after_net[1]);
}

TEST(LayerNumbers, DataParallelsClonesShiftNoLaterLayer) {
  NumberedNet net;
  const auto after_net = upcoming_layer_numbers(2);
  validate(net.ptr(), [&] { syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), kTwoReplicas); });
  syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), std::vector<torch::Device>(3, torch::kCPU));
  EXPECT_EQ(upcoming_layer_numbers(2), after_net);
}

TEST(LayerNumbers, NestedLayersCloneShiftsNoLaterLayer) {
  NestedNet net;
  const auto after_net = upcoming_layer_numbers(3);
  auto ema = std::dynamic_pointer_cast<NestedNetImpl>(net->clone());  // e.g. on rank 0 only
  ASSERT_NE(ema, nullptr);
  EXPECT_EQ(ema->block_number(), net->block_number());
  EXPECT_EQ(ema->seq_number(), net->seq_number());
  EXPECT_EQ(upcoming_layer_numbers(3), after_net);
  // A clone of the clone is the same layers too.
  auto ema_of_ema = std::dynamic_pointer_cast<NestedNetImpl>(ema->clone());
  ASSERT_NE(ema_of_ema, nullptr);
  EXPECT_EQ(ema_of_ema->block_number(), net->block_number());
  EXPECT_EQ(ema_of_ema->seq_number(), net->seq_number());
  EXPECT_EQ(upcoming_layer_numbers(3), after_net);
  // Dropping the clones gives nothing back: the originals still hold their numbers.
  ema.reset();
  ema_of_ema.reset();
  EXPECT_EQ(upcoming_layer_numbers(3), after_net);
}

TEST(LayerNumbers, NestedLayersDataParallelShiftsNoLaterLayer) {
  NestedNet net;
  const auto after_net = upcoming_layer_numbers(3);
  validate(net.ptr(), [&] { syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), kTwoReplicas); });
  EXPECT_EQ(upcoming_layer_numbers(3), after_net);
  // Training forwards clone too, at every step, on every rank (those leaked numbers alike on every rank).
  for (int step = 0; step < 2; ++step) syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), kTwoReplicas);
  EXPECT_EQ(upcoming_layer_numbers(3), after_net);
}

TEST(LayerNumbers, AModelDestroyedUnusedGivesItsNumbersBack) {
  // Built and dropped alike on every rank (or built by a clone() on one rank only): known to no other rank.
  const auto expected = upcoming_layer_numbers(3);
  {
    NestedNet net;
    EXPECT_EQ(net->block_number(), expected[0]);
    EXPECT_EQ(net->seq_number(), expected[1]);
    // An eval-mode forward publishes nothing (what a rank does alone: a validation).
    validate(net.ptr(), [&] {
      net->forward(torch::randn({4, 3, 2, 2}));
      syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), kTwoReplicas);
    });
  }
  EXPECT_EQ(upcoming_layer_numbers(3), expected);
}

TEST(LayerNumbers, DestroyingATrainedLayerGivesNothingBack) {
  // A rank that deletes a model it trained must not renumber the layers it builds next.
  const auto expected = upcoming_layer_numbers(2);
  {
    syncbn::SyncBatchNorm2d bn(3);
    EXPECT_EQ(bn->layer_id(), expected[0]);
    bn->forward(torch::randn({4, 3, 2, 2}));
  }
  EXPECT_EQ(next_layer_number(), expected[1]);
}

TEST(LayerNumbers, AReplicasTrainingForwardKeepsTheOriginalsNumbers) {
  // The replicas share the original's numbers: their forwards publish them.
  const auto expected = upcoming_layer_numbers(3);
  {
    NestedNet net;
    syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), kTwoReplicas);
  }
  EXPECT_EQ(next_layer_number(), expected[2]);
}

TEST(LayerNumbers, ACopyKeepsTheNumberUntilTheLastHolderIsGone) {
  const auto expected = upcoming_layer_numbers(2);
  syncbn::SyncBatchNorm2d bn(3);
  auto copy = std::make_shared<syncbn::SyncBatchNorm2dImpl>(*bn);
  bn = syncbn::SyncBatchNorm2d(nullptr);
  EXPECT_EQ(next_layer_number(), expected[1]);
  copy.reset();
  EXPECT_EQ(next_layer_number(), expected[0]);
}

TEST(LayerNumbers, AssignmentTakesTheOtherLayersNumberAndKeepsASharedOne) {
  const auto expected = upcoming_layer_numbers(3);
  syncbn::SyncBatchNorm2d source(3), target(3);
  const int64_t target_number = target->layer_id();
  EXPECT_EQ(target_number, expected[1]);
  auto copy = std::make_shared<syncbn::SyncBatchNorm2dImpl>(*target);  // shares target's number
  *target = *source;
  EXPECT_EQ(target->layer_id(), source->layer_id());
  EXPECT_EQ(copy->layer_id(), target_number);
  // `copy` still holds target's old number: it was not given back.
  EXPECT_EQ(next_layer_number(), expected[2]);
  // Assigned over in its turn, the last holder gives it back.
  *copy = *source;
  EXPECT_EQ(next_layer_number(), target_number);
}

}  // namespace
