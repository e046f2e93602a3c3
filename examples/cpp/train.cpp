// Trains a small conv net with synchronized BatchNorm on 4 CPU replicas:
// every step, the batch of 32 is split over the replicas (8 images each), and
// the BatchNorm statistics are those of all 32 images.
#include <iostream>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }

  // Cloneable: (re)creates the submodules; syncbn::replicate clones the net per replica.
  void reset() override {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 16, 3).padding(1)));
    bn1 = register_module("bn1", syncbn::SyncBatchNorm2d(16));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1).stride(2)));
    bn2 = register_module("bn2", syncbn::SyncBatchNorm2d(32));
    head = register_module("head", torch::nn::Linear(32, 10));
  }

  torch::Tensor forward(const torch::Tensor& images) {
    auto x = torch::relu(bn1->forward(conv1->forward(images)));
    x = torch::relu(bn2->forward(conv2->forward(x)));
    return head->forward(x.mean({2, 3}));
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  syncbn::SyncBatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Net);

int main() {
  torch::manual_seed(0);
  Net net;
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  const std::vector<torch::Device> replicas(4, torch::kCPU);

  // Synthetic data: labels given by a fixed random linear teacher.
  const auto teacher = torch::randn({3 * 16 * 16, 10});
  for (int step = 1; step <= 20; ++step) {
    auto images = torch::randn({32, 3, 16, 16}) * 2 + torch::randn({32, 3, 1, 1});
    auto labels = images.flatten(1).matmul(teacher).argmax(1);
    optimizer.zero_grad();
    auto logits = syncbn::data_parallel(net, images, replicas);
    auto loss = torch::nn::functional::cross_entropy(logits, labels);
    loss.backward();
    optimizer.step();
    if (step % 5 == 0) std::cout << "step " << step << "  loss " << loss.item<double>() << std::endl;
  }
  std::cout << "bn1 running mean (first 4 channels): " << net->bn1->running_mean.slice(0, 0, 4) << "\n"
            << "trained with syncbn " << syncbn::version() << " on 4 CPU replicas" << std::endl;
  return 0;
}
