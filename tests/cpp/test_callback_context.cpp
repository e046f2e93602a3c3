#include <gtest/gtest.h>

#include <thread>

#include <syncbn/syncbn.h>

namespace {

TEST(CallbackContext, TypedGetAndSet) {
  syncbn::CallbackContext context;
  EXPECT_FALSE(context.contains("sync_master"));
  context.set<int64_t>("count", 3);
  context.set<std::string>("name", "bn1");
  EXPECT_EQ(context.get<int64_t>("count"), 3);
  EXPECT_EQ(context.get<std::string>("name"), "bn1");
  EXPECT_EQ(context.size(), 2u);
  EXPECT_EQ(context.keys(), (std::vector<std::string>{"count", "name"}));
  context.set<int64_t>("count", 4);  // overwrite
  EXPECT_EQ(context.get<int64_t>("count"), 4);
  EXPECT_TRUE(context.erase("count"));
  EXPECT_FALSE(context.erase("count"));
  EXPECT_FALSE(context.contains("count"));
}

TEST(CallbackContext, MissingKeyAndWrongTypeAreErrors) {
  syncbn::CallbackContext context;
  context.set<int64_t>("count", 3);
  EXPECT_THROW(context.get<int64_t>("absent"), c10::Error);
  try {
    context.get<std::string>("count");
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what()).find("'count'"), std::string::npos) << error.what();
  }
  EXPECT_FALSE(context.try_get<std::string>("count").has_value());
  EXPECT_FALSE(context.try_get<int64_t>("absent").has_value());
  EXPECT_EQ(context.try_get<int64_t>("count").value(), 3);
}

TEST(CallbackContext, SharedPointersSurviveAndConcurrentWritersAreSafe) {
  syncbn::CallbackContext context;
  auto master = std::make_shared<syncbn::SyncMaster>([](syncbn::MessageList m) { return m; });
  context.set("sync_master", master);
  EXPECT_EQ(context.get<std::shared_ptr<syncbn::SyncMaster>>("sync_master").get(), master.get());

  std::vector<std::thread> writers;
  for (int t = 0; t < 8; ++t) {
    writers.emplace_back([&context, t] {
      for (int i = 0; i < 1000; ++i) {
        context.set<int64_t>("key" + std::to_string(t), i);
        EXPECT_EQ(context.get<int64_t>("key" + std::to_string(t)), i);
      }
    });
  }
  for (auto& w : writers) w.join();
  EXPECT_EQ(context.size(), 9u);
}

}  // namespace
