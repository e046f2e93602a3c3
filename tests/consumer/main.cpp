// Links the installed syncbn::syncbn and drives the barrier from 4 threads.
#include <iostream>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

int main() {
  constexpr int64_t kCopies = 4;
  syncbn::SyncMaster master([](syncbn::MessageList messages) {
    at::Tensor total = at::zeros({1});
    for (const auto& entry : messages) total += entry.second.tensors.at(0);
    syncbn::MessageList results;
    for (const auto& entry : messages) results.emplace_back(entry.first, syncbn::Message{{total}, {}, nullptr});
    return results;
  });
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes;
  for (int64_t id = 1; id < kCopies; ++id) pipes.push_back(master.register_slave(id));

  std::vector<std::thread> slaves;
  for (auto& pipe : pipes) {
    slaves.emplace_back([pipe] {
      for (int pass = 0; pass < 100; ++pass) {
        pipe->run_slave(syncbn::Message{{at::full({1}, static_cast<double>(pipe->copy_id()))}, {}, nullptr});
      }
    });
  }
  double total = 0;
  for (int pass = 0; pass < 100; ++pass) {
    total = master.run_master(syncbn::Message{{at::zeros({1})}, {}, nullptr}).tensors.at(0).item<double>();
  }
  for (auto& thread : slaves) thread.join();
  if (total != 6.0) {
    std::cerr << "consumer: expected 6, got " << total << "\n";
    return 1;
  }
  std::cout << "consumer OK: syncbn " << syncbn::version() << " built with " << syncbn::compiler_version()
            << ", 4 copies x 100 passes\n";
  return 0;
}
