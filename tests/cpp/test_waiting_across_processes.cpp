// A barrier's slaves do not time out while the master callback waits for other ranks of a process group (the
// group's timeout bounds that wait); the callback's own work after it gets the barrier's timeout, counted from the
// wait's end. White-box: the cross-process wait is marked with the library's internal scope, as cross_process.cpp
// marks its exchanges, so that no process group is needed.

#include <gtest/gtest.h>

#include <chrono>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <torch/torch.h>

#include <syncbn/data_parallel.h>
#include <syncbn/syncbn.h>

#include "waiting_across_processes.h"

namespace {

using namespace std::chrono_literals;
using syncbn::Message;
using syncbn::MessageList;

// A master callback that waits "across processes" for `waiting`, then works (not waiting) for `merging`, then
// hands every copy the sum of their first tensors.
syncbn::MasterCallback wait_then_merge(std::chrono::milliseconds waiting, std::chrono::milliseconds merging) {
  return [=](MessageList messages) {
    {
      syncbn::detail::WaitingAcrossProcesses across;
      std::this_thread::sleep_for(waiting);
    }
    std::this_thread::sleep_for(merging);
    at::Tensor total = at::zeros({1}, at::kDouble);
    for (const auto& entry : messages) total += entry.second.tensors.at(0);
    MessageList results;
    for (const auto& entry : messages) results.emplace_back(entry.first, Message{{total}, {}, nullptr});
    return results;
  };
}

Message message_of(int64_t copy_id) {
  return Message{{at::full({1}, static_cast<double>(copy_id + 1), at::kDouble)}, {}, nullptr};
}

// A barrier of two copies with a 1 s timeout whose master callback is wait_then_merge(waiting, merging): runs the
// master (copy 0) here and copy 1 on a thread; returns each side's error message ("" if none).
std::pair<std::string, std::string> run_two_copies(std::chrono::milliseconds waiting,
                                                   std::chrono::milliseconds merging) {
  syncbn::SyncMaster master(wait_then_merge(waiting, merging), 1.0);
  auto pipe = master.register_slave(1);
  std::string slave_error;
  std::thread slave([&] {
    try {
      EXPECT_EQ(pipe->run_slave(message_of(1)).tensors.at(0).item<double>(), 3.0);
    } catch (const std::exception& error) {
      slave_error = error.what();
    }
  });
  std::string master_error;
  try {
    EXPECT_EQ(master.run_master(message_of(0)).tensors.at(0).item<double>(), 3.0);
  } catch (const std::exception& error) {
    master_error = error.what();
  }
  slave.join();
  return {master_error, slave_error};
}

TEST(BarrierAcrossProcesses, SlavesWaitOutACrossProcessWaitLongerThanTheirTimeout) {
  EXPECT_EQ(run_two_copies(2500ms, 0ms), std::make_pair(std::string(), std::string()));
}

// The slave's deadline is renewed at ~1 s (the callback waits across processes until ~1.9 s) to ~2 s; at ~2 s the
// callback no longer waits but merges until ~2.3 s. Its merge began 0.4 s before, within the timeout: the slave must
// wait on, with a deadline counted from the wait's end (~2.9 s). Renewing only while the callback waits at the
// deadline's instant timed the slave out here (a flaky multi-process test under load).
TEST(BarrierAcrossProcesses, AMergeThatEndsWithinATimeoutOfTheCrossProcessWaitIsWaitedFor) {
  EXPECT_EQ(run_two_copies(1900ms, 400ms), std::make_pair(std::string(), std::string()));
}

// The callback's own work is still bounded: a merge longer than the timeout after the wait times the slave out.
TEST(BarrierAcrossProcesses, AMergeLongerThanTheTimeoutAfterTheCrossProcessWaitTimesOut) {
  const auto started = std::chrono::steady_clock::now();
  const auto [master_error, slave_error] = run_two_copies(300ms, 1800ms);
  EXPECT_NE(slave_error.find("every copy arrived, but the master callback did not return in time"), std::string::npos)
      << slave_error;
  EXPECT_NE(master_error.find("did not return in time"), std::string::npos) << master_error;
  EXPECT_GE(std::chrono::steady_clock::now() - started, 1300ms);
}

TEST(BarrierAcrossProcesses, AnyThreadsLastCrossProcessWaitIsNowWhileOneWaits) {
  {
    syncbn::detail::WaitingAcrossProcesses across;
    auto before = std::chrono::steady_clock::now();
    EXPECT_GE(syncbn::detail::last_waited_across_processes(), before);
    std::thread other([] {
      syncbn::detail::WaitingAcrossProcesses nested_elsewhere;  // another thread's wait ending: one still waits
    });
    other.join();
    before = std::chrono::steady_clock::now();
    EXPECT_GE(syncbn::detail::last_waited_across_processes(), before);
  }
  std::this_thread::sleep_for(50ms);
  const auto ended = syncbn::detail::last_waited_across_processes();
  ASSERT_TRUE(ended.has_value());
  EXPECT_GE(std::chrono::steady_clock::now() - *ended, 40ms);
}

// A replica body: copy 1 waits "across processes" for `waiting` (a late rank), then works for `working`; the
// others return at once.
std::function<void(int64_t)> copy_1_waits_then_works(std::chrono::milliseconds waiting,
                                                     std::chrono::milliseconds working) {
  return [=](int64_t copy) {
    if (copy != 1) return;
    {
      syncbn::detail::WaitingAcrossProcesses across;
      std::this_thread::sleep_for(waiting);
    }
    std::this_thread::sleep_for(working);
  };
}

// run_replicas gives the others $SYNCBN_TIMEOUT after a replica's return, counted from the end of a later wait for
// other ranks: replica 1 waits "across processes" 1.5 s (a late rank), then works 0.3 s, with SYNCBN_TIMEOUT=1.
// Given up on 1 s after replica 0's return before (a parallel backward's copy may return while another waits).
TEST(BarrierAcrossProcesses, RunReplicasWaitsForAReplicaWaitingAcrossProcessesAfterAnotherReturned) {
  ::setenv("SYNCBN_TIMEOUT", "1", 1);
  const auto body = copy_1_waits_then_works(1500ms, 300ms);
  EXPECT_NO_THROW(syncbn::detail::run_replicas(2, body, [](const std::string&) {}, std::nullopt));
  ::unsetenv("SYNCBN_TIMEOUT");
}

// Its work after the wait is still bounded by the timeout.
TEST(BarrierAcrossProcesses, RunReplicasGivesUpOnAReplicaWorkingLongerThanTheTimeoutAfterItsWait) {
  ::setenv("SYNCBN_TIMEOUT", "0.5", 1);
  const auto body = copy_1_waits_then_works(200ms, 1500ms);
  try {
    syncbn::detail::run_replicas(2, body, [](const std::string&) {}, std::nullopt);
    ADD_FAILURE() << "expected a BarrierTimeoutError";
  } catch (const syncbn::BarrierTimeoutError& error) {
    EXPECT_NE(std::string(error.what()).find("replica(s) [1] did not return within 0.5 s"), std::string::npos)
        << error.what();
  }
  ::unsetenv("SYNCBN_TIMEOUT");
  std::this_thread::sleep_for(1500ms);  // the detached replica ends before the test does
}

}  // namespace
