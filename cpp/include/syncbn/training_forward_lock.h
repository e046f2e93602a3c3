#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include <torch/nn/module.h>

#include <syncbn/export.h>

namespace syncbn {

// Held by syncbn::data_parallel from before its clones to the write-back: the
// replicas work on copies of the module's buffers, copied back at the end, so two
// training forwards at once from two threads over the same buffers would each
// write back its own update over the other's. Those forwards therefore run one
// after another: the lock holds one mutex per module of the tree that has
// buffers of its own, so a module is serialized with its submodules' forwards
// too (data_parallel(seq) and data_parallel(seq[0])), and two trees sharing a
// layer with each other. The mutexes are taken in one process-wide order
// (by module address), so overlapping trees cannot deadlock.
//
// Nothing is held when no module of the tree is training (eval forwards update
// no running statistics). The lock is reentrant: a forward that calls
// data_parallel again on its own thread goes on for the modules it holds (a
// nested call over modules it does not hold waits for them, in order).
class SYNCBN_API TrainingForwardLock {
 public:
  explicit TrainingForwardLock(const std::shared_ptr<torch::nn::Module>& module);
  ~TrainingForwardLock();
  TrainingForwardLock(const TrainingForwardLock&) = delete;
  TrainingForwardLock& operator=(const TrainingForwardLock&) = delete;

  // Whether this lock holds anything (a module of the tree was training and has buffers).
  bool held() const { return !mutexes_.empty(); }

 private:
  std::vector<std::shared_ptr<std::recursive_mutex>> mutexes_;  // in locking order
};

}  // namespace syncbn
