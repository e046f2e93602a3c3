#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/module.h>

#include <syncbn/cross_process.h>
#include <syncbn/export.h>

namespace syncbn {

// What a synchronized layer tells a wrapper of its module before a forward:
// the process group its forward would exchange on now (training mode, a group
// of several ranks), else null.
class SYNCBN_API CrossProcessLayer {
 public:
  virtual ~CrossProcessLayer() = default;
  virtual ProcessGroupPtr exchanging_group() const = 0;
};

// One forward of a module with replicas in each process of a group
// (syncbn::data_parallel). A forward that fails after a synchronized call that
// paired meets the other ranks at another call (a BarrierError on every rank);
// one that fails before any would leave them waiting at their first call,
// which would then pair with this rank's next forward, one step apart for good.
// So when it failed having made no synchronized call (other than ones a
// failure was told in), this rank tells the others (announce_failed_forward),
// and every rank fails that step.
//
// Where the module's synchronized layers exchange on several groups, it tells
// each group on which no failure was told yet, all at once: the other ranks
// fail at their first call of one of them, and tell the others the same way.
// Not in a replica (the outer forward tells). Counted from construction: make
// it once the forward holds its module's TrainingForwardLock (data_parallel
// does), so that another thread's forward it waited for counts no call of its
// own.
class SYNCBN_API ForwardAcrossProcesses {
 public:
  // Before the forward: `module`'s synchronized layers (CrossProcessLayer) in
  // their current mode; `device`: where copy 0 exchanges (the first replica's).
  ForwardAcrossProcesses(const torch::nn::Module& module, at::Device device);
  // The forward failed: tells the other ranks (see above). Throws nothing (the
  // caller rethrows the forward's error): where telling failed too (the
  // group's timeout: no rank came), warns.
  void failed() noexcept;

 private:
  // The groups its layers exchange on, each with the calls made on it before the forward, and those of them that
  // failed (a failure told): none, nothing to tell.
  struct GroupBefore {
    ProcessGroupPtr group;
    int64_t calls;
    int64_t failed;
  };
  std::vector<GroupBefore> groups_;
  at::Device device_;
};

}  // namespace syncbn
