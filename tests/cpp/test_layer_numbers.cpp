// Layer numbers identify a synchronized layer across processes (construction order): copies made on one rank
// only (an EMA model, clone(), an eval-mode data_parallel) must not shift the numbers of layers built later.
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

int64_t next_layer_number() { return syncbn::SyncBatchNorm2d(1)->layer_id(); }

TEST(LayerNumbers, AreTakenInConstructionOrder) {
  syncbn::SyncBatchNorm2d a(3);
  syncbn::SyncBatchNorm1d b(3);
  EXPECT_EQ(b->layer_id(), a->layer_id() + 1);
}

TEST(LayerNumbers, ACloneKeepsTheOriginalsNumbersAndShiftsNoLaterLayer) {
  NumberedNet net;
  EXPECT_EQ(net->head->layer_id(), net->bn->layer_id() + 1);
  const int64_t after_net = net->head->layer_id() + 1;
  auto ema = std::dynamic_pointer_cast<NumberedNetImpl>(net->clone());  // e.g. on rank 0 only
  ASSERT_NE(ema, nullptr);
  EXPECT_EQ(ema->bn->layer_id(), net->bn->layer_id());
  EXPECT_EQ(ema->head->layer_id(), net->head->layer_id());
  // The layers clone()'s reset() built (and that it overwrote) gave their numbers back.
  syncbn::SyncBatchNorm2d later(3), later_still(3);
  EXPECT_EQ(later->layer_id(), after_net);
  EXPECT_EQ(later_still->layer_id(), after_net + 1);
}

TEST(LayerNumbers, DataParallelsClonesShiftNoLaterLayer) {
  NumberedNet net;
  const int64_t after_net = net->head->layer_id() + 1;
  {
    torch::NoGradGuard no_grad;
    net->eval();  // e.g. a validation on rank 0 only
    syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), std::vector<torch::Device>(2, torch::kCPU));
    net->train();
  }
  syncbn::data_parallel(net, torch::randn({4, 3, 2, 2}), std::vector<torch::Device>(3, torch::kCPU));
  EXPECT_EQ(next_layer_number(), after_net);
}

TEST(LayerNumbers, DestroyingALayerGivesNothingBack) {
  // A rank that deletes a model must not renumber the layers it builds next.
  int64_t destroyed = -1;
  { destroyed = syncbn::SyncBatchNorm2d(3)->layer_id(); }
  EXPECT_EQ(next_layer_number(), destroyed + 1);
}

TEST(LayerNumbers, AssignmentTakesTheOtherLayersNumberAndKeepsASharedOne) {
  syncbn::SyncBatchNorm2d source(3), target(3);
  const int64_t target_number = target->layer_id();
  auto copy = std::make_shared<syncbn::SyncBatchNorm2dImpl>(*target);  // shares target's number
  *target = *source;
  EXPECT_EQ(target->layer_id(), source->layer_id());
  EXPECT_EQ(copy->layer_id(), target_number);
  // `copy` still holds target's old number: it was not given back.
  EXPECT_EQ(next_layer_number(), target_number + 1);
}

}  // namespace
