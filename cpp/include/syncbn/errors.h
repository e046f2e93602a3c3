#pragma once

#include <stdexcept>
#include <string>

#include <syncbn/export.h>

namespace syncbn {

// Base of every error the barrier raises for a pass that could not complete.
class SYNCBN_API BarrierError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Some copies never arrived within the barrier's timeout.
class SYNCBN_API BarrierTimeoutError : public BarrierError {
 public:
  using BarrierError::BarrierError;
};

// The pass was aborted: by abort(reason), or because a new replication
// (a new generation of registrations) replaced the one being waited on.
class SYNCBN_API BarrierAbortedError : public BarrierError {
 public:
  using BarrierError::BarrierError;
};

}  // namespace syncbn
