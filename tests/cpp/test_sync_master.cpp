#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <thread>

#include <torch/torch.h>

#include <syncbn/syncbn.h>

namespace {

using syncbn::Message;
using syncbn::MessageList;

// Every copy sends (tensor filled with copy_id + pass, [copy_id, pass]); the
// master sums the tensors and hands every copy (sum, [its own id, copies seen]).
MessageList sum_callback(MessageList messages) {
  at::Tensor total = at::zeros({2}, at::kDouble);
  for (const auto& entry : messages) total += entry.second.tensors.at(0);
  MessageList results;
  for (const auto& entry : messages) {
    results.emplace_back(entry.first, Message{{total}, {entry.first, static_cast<int64_t>(messages.size())}, nullptr});
  }
  return results;
}

Message make_message(int64_t copy_id, int64_t pass) {
  return Message{{at::full({2}, static_cast<double>(copy_id + pass), at::kDouble)}, {copy_id, pass}, nullptr};
}

// Runs `body(copy_id)` for copies 1..n-1 on their own threads and copy 0 on this one;
// joins them all, then rethrows the first failure.
void run_copies(int64_t n, const std::function<void(int64_t)>& body) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(n);
  for (int64_t id = 1; id < n; ++id) {
    threads.emplace_back([&, id] {
      try {
        body(id);
      } catch (...) {
        errors[id] = std::current_exception();
      }
    });
  }
  try {
    body(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

class BarrierPasses : public ::testing::TestWithParam<int64_t> {};

TEST_P(BarrierPasses, ThousandPassesGiveEveryCopyTheRightResult) {
  const int64_t n = GetParam();
  syncbn::SyncMaster master(sum_callback, 60.0);
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(n);
  for (int64_t id = 1; id < n; ++id) pipes[id] = master.register_slave(id);
  EXPECT_EQ(master.nr_slaves(), n - 1);
  std::atomic<int64_t> checked{0};
  run_copies(n, [&](int64_t id) {
    for (int64_t pass = 0; pass < 1000; ++pass) {
      Message result = id == 0 ? master.run_master(make_message(id, pass)) : pipes[id]->run_slave(make_message(id, pass));
      // sum over copies of (copy + pass) = n(n-1)/2 + n * pass
      const double expected = static_cast<double>(n * (n - 1) / 2 + n * pass);
      ASSERT_EQ(result.tensors.at(0)[0].item<double>(), expected);
      ASSERT_EQ(result.ints.at(0), id);
      ASSERT_EQ(result.ints.at(1), n);
      ++checked;
    }
  });
  EXPECT_EQ(checked.load(), n * 1000);
}

INSTANTIATE_TEST_SUITE_P(Replicas, BarrierPasses, ::testing::Values(2, 4, 8));

TEST(SyncMaster, CallbackSeesMasterFirstThenCopiesInIdOrder) {
  std::vector<int64_t> seen;
  syncbn::SyncMaster master([&seen](MessageList messages) {
    for (const auto& entry : messages) seen.push_back(entry.first);
    MessageList results;
    // Answer in reverse order after the master's: the barrier must route by id.
    results.emplace_back(0, Message{{}, {0}, nullptr});
    for (auto it = messages.rbegin(); it != messages.rend() - 1; ++it) {
      results.emplace_back(it->first, Message{{}, {it->first * 10}, nullptr});
    }
    return results;
  });
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(4);
  for (int64_t id : {3, 1, 2}) pipes[id] = master.register_slave(id);
  run_copies(4, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 0)) : pipes[id]->run_slave(make_message(id, 0));
    EXPECT_EQ(result.ints.at(0), id * 10);
  });
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(master.slave_ids(), (std::vector<int64_t>{1, 2, 3}));
}

TEST(SyncMaster, CallbackExceptionReachesEveryCopyAndTheNextPassWorks) {
  std::atomic<bool> fail{true};
  syncbn::SyncMaster master([&fail](MessageList messages) {
    if (fail.load()) throw std::invalid_argument("bad statistics");
    return sum_callback(std::move(messages));
  });
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(4);
  for (int64_t id = 1; id < 4; ++id) pipes[id] = master.register_slave(id);
  std::atomic<int> failures{0};
  run_copies(4, [&](int64_t id) {
    try {
      id == 0 ? master.run_master(make_message(id, 0)) : pipes[id]->run_slave(make_message(id, 0));
    } catch (const std::invalid_argument& error) {
      EXPECT_STREQ(error.what(), "bad statistics");
      ++failures;
    }
  });
  EXPECT_EQ(failures.load(), 4);
  fail = false;
  run_copies(4, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 1)) : pipes[id]->run_slave(make_message(id, 1));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 6.0 + 4.0);
  });
}

TEST(SyncMaster, AbortWakesEveryWaiterWithTheReason) {
  syncbn::SyncMaster master(sum_callback, 60.0);
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(4);
  for (int64_t id = 1; id < 4; ++id) pipes[id] = master.register_slave(id);
  std::atomic<int> aborted{0};
  std::vector<std::thread> waiters;
  // Copies 1 and 2 and the master wait for copy 3, which never comes.
  for (int64_t id = 1; id < 3; ++id) {
    waiters.emplace_back([&, id] {
      try {
        pipes[id]->run_slave(make_message(id, 0));
      } catch (const syncbn::BarrierAbortedError& error) {
        EXPECT_NE(std::string(error.what()).find("replica 3 raised"), std::string::npos) << error.what();
        ++aborted;
      }
    });
  }
  waiters.emplace_back([&] {
    try {
      master.run_master(make_message(0, 0));
    } catch (const syncbn::BarrierAbortedError&) {
      ++aborted;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  master.abort("replica 3 raised");
  for (auto& t : waiters) t.join();
  EXPECT_EQ(aborted.load(), 3);
  // Copy 3 arriving late for the failed pass fails at once instead of waiting.
  EXPECT_THROW(pipes[3]->run_slave(make_message(3, 0)), syncbn::BarrierAbortedError);
  // The next pass works.
  run_copies(4, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 1)) : pipes[id]->run_slave(make_message(id, 1));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 10.0);
  });
}

TEST(SyncMaster, AbortBeforeAnyoneArrivesFailsThatPass) {
  syncbn::SyncMaster master(sum_callback, 60.0);
  auto pipe = master.register_slave(1);
  master.abort("replica 1 failed before its first layer");
  EXPECT_THROW(master.run_master(make_message(0, 0)), syncbn::BarrierAbortedError);
  EXPECT_THROW(pipe->run_slave(make_message(1, 0)), syncbn::BarrierAbortedError);
  run_copies(2, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 1)) : pipe->run_slave(make_message(id, 1));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 3.0);
  });
}

TEST(SyncMaster, TimeoutNamesTheMissingCopies) {
  syncbn::SyncMaster master(sum_callback, 0.2);
  master.set_label("bn3");
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(5);
  for (int64_t id = 1; id < 5; ++id) pipes[id] = master.register_slave(id);
  std::atomic<int> timeouts{0};
  std::vector<std::thread> waiters;
  for (int64_t id : {1, 3}) {
    waiters.emplace_back([&, id] {
      try {
        pipes[id]->run_slave(make_message(id, 0));
      } catch (const syncbn::BarrierTimeoutError& error) {
        const std::string message = error.what();
        EXPECT_NE(message.find("[2, 4]"), std::string::npos) << message;
        EXPECT_NE(message.find("bn3"), std::string::npos) << message;
        ++timeouts;
      }
    });
  }
  try {
    master.run_master(make_message(0, 0));
    ADD_FAILURE() << "expected a timeout";
  } catch (const syncbn::BarrierTimeoutError& error) {
    EXPECT_NE(std::string(error.what()).find("copies that never arrived: [2, 4]"), std::string::npos) << error.what();
    ++timeouts;
  }
  for (auto& t : waiters) t.join();
  EXPECT_EQ(timeouts.load(), 3);
  // Stragglers of the failed pass fail fast; the pass after works.
  EXPECT_THROW(pipes[2]->run_slave(make_message(2, 0)), syncbn::BarrierTimeoutError);
  EXPECT_THROW(pipes[4]->run_slave(make_message(4, 0)), syncbn::BarrierTimeoutError);
  master.set_timeout_seconds(60.0);
  run_copies(5, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 1)) : pipes[id]->run_slave(make_message(id, 1));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 15.0);
  });
}

TEST(SyncMaster, SlaveTimesOutWhenTheMasterNeverComes) {
  syncbn::SyncMaster master(sum_callback, 0.2);
  auto pipe = master.register_slave(1);
  try {
    pipe->run_slave(make_message(1, 0));
    FAIL() << "expected a timeout";
  } catch (const syncbn::BarrierTimeoutError& error) {
    EXPECT_NE(std::string(error.what()).find("[0]"), std::string::npos) << error.what();
  }
}

TEST(SyncMaster, TimeoutComesFromTheEnvironmentWhenNotGiven) {
  ::setenv("SYNCBN_TIMEOUT", "12.5", 1);
  EXPECT_EQ(syncbn::default_timeout_seconds(), 12.5);
  EXPECT_EQ(syncbn::SyncMaster(sum_callback).timeout_seconds(), 12.5);
  EXPECT_EQ(syncbn::SyncMaster(sum_callback, 3.0).timeout_seconds(), 3.0);
  ::setenv("SYNCBN_TIMEOUT", "soon", 1);
  EXPECT_THROW(syncbn::default_timeout_seconds(), c10::ValueError);
  ::unsetenv("SYNCBN_TIMEOUT");
  EXPECT_EQ(syncbn::default_timeout_seconds(), 300.0);
  EXPECT_THROW(syncbn::SyncMaster(sum_callback, 0.0), c10::ValueError);
}

TEST(SyncMaster, RegisteringAfterAPassStartsANewGeneration) {
  syncbn::SyncMaster master(sum_callback, 60.0);
  auto old_pipe = master.register_slave(1);
  run_copies(2, [&](int64_t id) { id == 0 ? master.run_master(make_message(0, 0)) : old_pipe->run_slave(make_message(1, 0)); });
  // A new replication: registration after a pass replaces the old slaves.
  auto pipe1 = master.register_slave(1);
  auto pipe2 = master.register_slave(2);
  EXPECT_EQ(master.nr_slaves(), 2);
  EXPECT_THROW(old_pipe->run_slave(make_message(1, 1)), syncbn::BarrierAbortedError);
  EXPECT_THROW(master.register_slave(0), c10::ValueError);  // 0 is the master
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes{nullptr, pipe1, pipe2};
  run_copies(3, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 0)) : pipes[id]->run_slave(make_message(id, 0));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 3.0);
  });
}

TEST(SyncMaster, RegisteringACopyAgainStartsANewGeneration) {
  // A replication that ran no pass (a layer in eval mode), then the next replication.
  syncbn::SyncMaster master(sum_callback, 60.0);
  auto stale = master.register_slave(1);
  master.register_slave(2);
  auto pipe1 = master.register_slave(1);
  EXPECT_EQ(master.slave_ids(), (std::vector<int64_t>{1}));
  EXPECT_THROW(stale->run_slave(make_message(1, 0)), syncbn::BarrierAbortedError);
  run_copies(2, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(id, 0)) : pipe1->run_slave(make_message(id, 0));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 1.0);
  });
}

TEST(SyncMaster, ResetForgetsTheSlavesOfTheLastReplication) {
  // Four copies, then a replication with the master alone (a batch of one sample).
  syncbn::SyncMaster master(sum_callback, 60.0);
  std::vector<std::shared_ptr<syncbn::SlavePipe>> pipes(4);
  for (int64_t id = 1; id < 4; ++id) pipes[id] = master.register_slave(id);
  run_copies(4, [&](int64_t id) {
    id == 0 ? master.run_master(make_message(id, 0)) : pipes[id]->run_slave(make_message(id, 0));
  });
  master.reset();
  EXPECT_EQ(master.nr_slaves(), 0);
  EXPECT_EQ(master.run_master(make_message(0, 7)).tensors.at(0)[0].item<double>(), 7.0);
  EXPECT_THROW(pipes[1]->run_slave(make_message(1, 1)), syncbn::BarrierAbortedError);
}

TEST(SyncMaster, NewGenerationWakesCopiesWaitingOnTheOldOne) {
  syncbn::SyncMaster master(sum_callback, 60.0);
  auto pipe1 = master.register_slave(1);
  auto pipe2 = master.register_slave(2);
  std::thread waiter([&] { EXPECT_THROW(pipe1->run_slave(make_message(1, 0)), syncbn::BarrierAbortedError); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  master.register_slave(1);  // the pass above had started: this is a new generation
  waiter.join();
}

TEST(SyncMaster, BadCallbackResultsFailThePassForEveryone) {
  syncbn::SyncMaster master([](MessageList messages) {
    messages.pop_back();  // forgets the last copy
    return messages;
  });
  auto pipe = master.register_slave(1);
  std::atomic<int> errors{0};  // both copies count from their own threads
  run_copies(2, [&](int64_t id) {
    try {
      id == 0 ? master.run_master(make_message(0, 0)) : pipe->run_slave(make_message(1, 0));
    } catch (const c10::Error& error) {
      EXPECT_NE(std::string(error.what()).find("one (copy_id, result) pair per copy"), std::string::npos);
      ++errors;
    }
  });
  EXPECT_EQ(errors, 2);
}

TEST(SyncMaster, CloseFailsEveryLaterPassUntilTheNextReplication) {
  syncbn::SyncMaster master(sum_callback, 60.0);
  auto pipe = master.register_slave(1);
  std::thread waiter([&] {
    try {
      pipe->run_slave(make_message(1, 0));
      ADD_FAILURE() << "expected BarrierAbortedError";
    } catch (const syncbn::BarrierAbortedError& error) {
      EXPECT_NE(std::string(error.what()).find("was closed: copy 2 failed"), std::string::npos) << error.what();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  master.close("copy 2 failed");
  waiter.join();
  EXPECT_TRUE(master.closed());
  for (int pass = 0; pass < 2; ++pass) {
    EXPECT_THROW(master.run_master(make_message(0, pass)), syncbn::BarrierAbortedError);
    EXPECT_THROW(pipe->run_slave(make_message(1, pass)), syncbn::BarrierAbortedError);
  }
  master.reset();  // the next replication opens it again
  EXPECT_FALSE(master.closed());
  auto next = master.register_slave(1);
  run_copies(2, [&](int64_t id) {
    Message result = id == 0 ? master.run_master(make_message(0, 0)) : next->run_slave(make_message(1, 0));
    EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 1.0);
  });
}

TEST(SyncMaster, AThreadOfAClosedReplicationStartsNoPassOnAnyBarrier) {
  auto group = std::make_shared<syncbn::ReplicationGroup>(2);
  syncbn::SyncMaster persistent(sum_callback, 60.0);  // a barrier that outlives replications (reset each one)
  group->close("the forward was given up");
  EXPECT_TRUE(group->closed());
  persistent.reset();
  {
    syncbn::ReplicaScope scope(group, 0);
    EXPECT_EQ(syncbn::ReplicaScope::current_group(), group.get());
    try {
      persistent.run_master(make_message(0, 0));
      FAIL() << "expected BarrierAbortedError";
    } catch (const syncbn::BarrierAbortedError& error) {
      EXPECT_NE(std::string(error.what()).find("the forward was given up"), std::string::npos) << error.what();
    }
  }
  EXPECT_EQ(syncbn::ReplicaScope::current_group(), nullptr);
  EXPECT_EQ(persistent.run_master(make_message(0, 3)).tensors.at(0)[0].item<double>(), 3.0);
  // A closed replication commits no write; a live one does.
  bool written = false;
  EXPECT_THROW(group->commit([&] { written = true; }), syncbn::BarrierAbortedError);
  EXPECT_FALSE(written);
  syncbn::ReplicationGroup live(2);
  live.commit([&] { written = true; });
  EXPECT_TRUE(written);
}

TEST(SyncMaster, CallingTheBarrierFromInsideTheCallbackSaysSo) {
  std::shared_ptr<syncbn::SyncMaster> master;
  std::string what;
  master = std::make_shared<syncbn::SyncMaster>([&](MessageList messages) {
    if (what == "run_master") master->run_master(make_message(0, 1));
    if (what == "reset") master->reset();
    return messages;
  });
  for (std::string call : {"run_master", "reset"}) {
    what = call;
    try {
      master->run_master(make_message(0, 0));
      FAIL() << "expected an error";
    } catch (const c10::Error& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find(call + "() was called from inside the master callback"), std::string::npos) << message;
      EXPECT_EQ(message.find("another thread"), std::string::npos) << message;
    }
  }
}

TEST(SyncMaster, NoSlavesMeansTheMasterRunsAlone) {
  syncbn::SyncMaster master(sum_callback);
  Message result = master.run_master(make_message(0, 5));
  EXPECT_EQ(result.tensors.at(0)[0].item<double>(), 5.0);
}

TEST(FutureResult, PutThenGetAndTimeout) {
  syncbn::FutureResult future;
  EXPECT_FALSE(future.ready());
  std::thread producer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    future.put(Message{{}, {42}, nullptr});
  });
  EXPECT_EQ(future.get().ints.at(0), 42);
  producer.join();
  future.put(Message{{}, {1}, nullptr});
  EXPECT_THROW(future.put(Message{}), c10::Error);  // the previous result was not fetched
  EXPECT_EQ(future.get().ints.at(0), 1);
  EXPECT_THROW(future.get(0.05), syncbn::BarrierTimeoutError);
  // As SyncMaster's timeouts: positive, NaN refused, infinity meaning none.
  EXPECT_THROW(future.get(-1.0), c10::ValueError);
  EXPECT_THROW(future.get(0.0), c10::ValueError);
  EXPECT_THROW(future.get(std::nan("")), c10::ValueError);
  future.put(Message{{}, {7}, nullptr});
  EXPECT_EQ(future.get(std::numeric_limits<double>::infinity()).ints.at(0), 7);
}

TEST(BarrierBenchmark, MeasuresARoundTrip) {
  const double us = syncbn::measure_barrier_round_trip_us(3, 100, 10);
  EXPECT_GT(us, 0.0);
  EXPECT_THROW(syncbn::measure_barrier_round_trip_us(0, 100), c10::ValueError);
}

}  // namespace
