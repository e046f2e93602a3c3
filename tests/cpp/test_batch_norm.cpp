#include <gtest/gtest.h>

#include <atomic>
#include <sstream>
#include <thread>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

namespace {

// Runs the synchronized forward of each slice on its own thread, copy 0 with
// the running statistics; returns the outputs in copy order.
std::vector<at::Tensor> run_replicas(const std::vector<at::Tensor>& slices, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& running_mean,
                                     const at::Tensor& running_var, syncbn::EpsMode mode = syncbn::EpsMode::Plus) {
  syncbn::SyncMaster master(syncbn::batch_norm_master_callback(), 60.0);
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(slices.size());
  for (size_t id = 1; id < slices.size(); ++id) pipes[id] = master.register_slave(static_cast<int64_t>(id));
  // Each copy gets parameters of its own, differentiable views made here, as
  // syncbn::replicate's clones have: making an edge to a node writes to that
  // node (autograd's Node::topological_nr() sets has_parent_), so copies linking
  // their graphs to one shared leaf's AccumulateGrad from several threads would
  // race (pytorch/pytorch#58442; found by ThreadSanitizer).
  std::vector<at::Tensor> weights, biases;
  for (size_t id = 0; id < slices.size(); ++id) {
    weights.push_back(weight.view_as(weight));
    biases.push_back(bias.view_as(bias));
  }
  std::vector<at::Tensor> outputs(slices.size());
  std::vector<std::exception_ptr> errors(slices.size());
  auto run = [&](size_t id) {
    try {
      syncbn::StatisticsExchange exchange = [&, id](syncbn::Message message) {
        return id == 0 ? master.run_master(std::move(message)) : pipes[id]->run_slave(std::move(message));
      };
      const bool master_copy = id == 0;
      outputs[id] = syncbn::sync_batch_norm_train(
          slices[id], weights[id], biases[id], master_copy ? std::optional<at::Tensor>(running_mean) : std::nullopt,
          master_copy ? std::optional<at::Tensor>(running_var) : std::nullopt, 0.1, 1e-5, mode, exchange);
    } catch (...) {
      errors[id] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (size_t id = 1; id < slices.size(); ++id) threads.emplace_back(run, id);
  run(0);
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return outputs;
}

TEST(SyncBatchNorm, ReplicasEqualOneBatchNormOnTheWholeBatch) {
  torch::manual_seed(0);
  auto options = torch::TensorOptions().dtype(torch::kDouble);
  at::Tensor x = torch::randn({10, 3, 4, 4}, options).requires_grad_();
  at::Tensor weight = torch::randn({3}, options).requires_grad_();
  at::Tensor bias = torch::randn({3}, options).requires_grad_();
  at::Tensor grad_out = torch::randn({10, 3, 4, 4}, options);

  // Reference: one BatchNorm over the whole batch.
  at::Tensor x_ref = x.detach().clone().requires_grad_();
  at::Tensor w_ref = weight.detach().clone().requires_grad_();
  at::Tensor b_ref = bias.detach().clone().requires_grad_();
  at::Tensor rm_ref = torch::zeros({3}, options), rv_ref = torch::ones({3}, options);
  at::Tensor y_ref = at::batch_norm(x_ref, w_ref, b_ref, rm_ref, rv_ref, true, 0.1, 1e-5, false);
  y_ref.backward(grad_out);

  // Four replicas with uneven slices, one of them empty.
  at::Tensor rm = torch::zeros({3}, options), rv = torch::ones({3}, options);
  auto outputs = run_replicas({x.slice(0, 0, 3), x.slice(0, 3, 3), x.slice(0, 3, 9), x.slice(0, 9, 10)}, weight,
                              bias, rm, rv);
  at::Tensor y = torch::cat(outputs);
  y.backward(grad_out);
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(x.grad(), x_ref.grad(), 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(weight.grad(), w_ref.grad(), 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(bias.grad(), b_ref.grad(), 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(rm, rm_ref, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(rv, rv_ref, 1e-12, 1e-12));
}

TEST(SyncBatchNorm, DoubleBackwardGivesTheWholeBatchsSecondDerivatives) {
  // Under create_graph the gradients are the whole batch's and have their graph, through the merge of the
  // copies' statistics: a second backward (a gradient penalty) gives at::batch_norm's second-order terms.
  torch::manual_seed(2);
  auto options = torch::TensorOptions().dtype(torch::kDouble);
  at::Tensor x = torch::randn({8, 3, 2, 2}, options).requires_grad_();
  at::Tensor weight = torch::rand({3}, options).add_(0.5).requires_grad_();
  at::Tensor bias = torch::randn({3}, options).requires_grad_();
  at::Tensor rm = torch::zeros({3}, options), rv = torch::ones({3}, options);
  at::Tensor y = torch::cat(run_replicas({x.slice(0, 0, 5), x.slice(0, 5, 8)}, weight, bias, rm, rv));
  auto grads = torch::autograd::grad({y.pow(3).sum()}, {x, weight}, {}, /*retain_graph=*/true, /*create_graph=*/true);

  at::Tensor x_ref = x.detach().clone().requires_grad_();
  at::Tensor w_ref = weight.detach().clone().requires_grad_();
  at::Tensor b_ref = bias.detach().clone().requires_grad_();
  at::Tensor y_ref = at::batch_norm(x_ref, w_ref, b_ref, {}, {}, true, 0.1, 1e-5, false);
  auto grads_ref = torch::autograd::grad({y_ref.pow(3).sum()}, {x_ref, w_ref}, {}, true, true);
  EXPECT_TRUE(torch::allclose(grads[0], grads_ref[0], 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(grads[1], grads_ref[1], 1e-10, 1e-10));

  (grads[0].square().sum() + grads[1].square().sum()).backward();
  (grads_ref[0].square().sum() + grads_ref[1].square().sum()).backward();
  EXPECT_TRUE(torch::allclose(x.grad(), x_ref.grad(), 1e-9, 1e-10));
  EXPECT_TRUE(torch::allclose(weight.grad(), w_ref.grad(), 1e-9, 1e-10));
  EXPECT_TRUE(torch::allclose(bias.grad(), b_ref.grad(), 1e-9, 1e-10));
}

TEST(SyncBatchNorm, AloneIsPlainBatchNormAndClampModeClampsTheVariance) {
  torch::manual_seed(1);
  auto options = torch::TensorOptions().dtype(torch::kDouble);
  at::Tensor x = torch::randn({6, 2, 5}, options);
  at::Tensor y = syncbn::sync_batch_norm_train(x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, 0.1, 1e-5,
                                               syncbn::EpsMode::Plus, syncbn::local_exchange());
  at::Tensor y_ref = at::batch_norm(x, {}, {}, {}, {}, true, 0.1, 1e-5, false);
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12));

  at::Tensor constant = torch::full({4, 2}, 3.0, options);  // variance 0 < eps
  at::Tensor clamped = syncbn::sync_batch_norm_train(constant + torch::randn({4, 2}, options) * 1e-6, std::nullopt,
                                                     std::nullopt, std::nullopt, std::nullopt, 0.1, 1e-2,
                                                     syncbn::EpsMode::Clamp, syncbn::local_exchange());
  EXPECT_LT(clamped.abs().max().item<double>(), 1e-3);  // (x - mean) / sqrt(eps): tiny
}

TEST(SyncBatchNorm, OneValuePerChannelIsAValueErrorInEveryCopy) {
  auto options = torch::TensorOptions().dtype(torch::kFloat);
  at::Tensor rm = torch::zeros({3}, options), rv = torch::ones({3}, options);
  try {
    run_replicas({torch::randn({1, 3}, options), torch::randn({0, 3}, options)}, torch::ones({3}, options),
                 torch::zeros({3}, options), rm, rv);
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("Expected more than 1 value per channel when training, got input size "
                                             "torch.Size([1, 3])"),
              std::string::npos)
        << error.what();
  }
  EXPECT_TRUE(torch::equal(rm, torch::zeros({3}, options)));  // untouched
}

TEST(SyncBatchNorm, ChannelCountMismatchIsBatchNormsError) {
  try {
    syncbn::sync_batch_norm_train(torch::randn({4, 3}), torch::ones({4}), std::nullopt, std::nullopt, std::nullopt,
                                  0.1, 1e-5, syncbn::EpsMode::Plus, syncbn::local_exchange());
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("weight should contain 3 elements not 4"), std::string::npos);
  }
}

TEST(SyncBatchNorm, OpsAreRegistered) {
  syncbn::register_ops();
  auto [mean, m2] = syncbn::local_stats(torch::arange(6, torch::kFloat).view({3, 2}));
  EXPECT_EQ(mean.scalar_type(), torch::kDouble);  // local statistics in float64 for every input
  EXPECT_TRUE(torch::allclose(mean, torch::tensor({2.0, 3.0}, torch::kDouble)));
  EXPECT_TRUE(torch::allclose(m2, torch::tensor({8.0, 8.0}, torch::kDouble)));
  EXPECT_EQ(syncbn::parse_eps_mode("clamp"), syncbn::EpsMode::Clamp);
  EXPECT_THROW(syncbn::parse_eps_mode("max"), c10::ValueError);
}

TEST(OnceDifferentiable, ASecondBackwardTowardWhatTheGradientsCameFromRaises) {
  auto x = torch::randn({3}, torch::requires_grad());
  const auto incoming = x * 2;  // a gradient that came in, with a graph to x
  const auto computed = incoming.detach() * 3;  // computed from it without a graph
  const auto linked = syncbn::once_differentiable({computed}, "differentiated twice", {incoming});
  ASSERT_TRUE(linked[0].requires_grad());
  try {
    torch::autograd::grad({linked[0].sum()}, {x});
    ADD_FAILURE() << "a second backward toward x did not reach the error node";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("differentiated twice"), std::string::npos) << error.what();
  }
  // Without the tensors it came from, torch.autograd.grad(..., inputs) skips the node: nothing found, no error.
  const auto unlinked = syncbn::once_differentiable({computed}, "differentiated twice");
  const auto found = torch::autograd::grad({unlinked[0].sum()}, {x}, {}, std::nullopt, false, /*allow_unused=*/true);
  EXPECT_FALSE(found[0].defined());
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
