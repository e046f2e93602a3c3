#pragma once

// Umbrella header: everything a LibTorch application needs from syncbn.
#include <syncbn/barrier_benchmark.h>
#include <syncbn/batch_norm.h>
#include <syncbn/batch_norm_channel.h>
#include <syncbn/callback_context.h>
#include <syncbn/cross_process.h>
#include <syncbn/data_parallel.h>
#include <syncbn/errors.h>
#include <syncbn/export.h>
#include <syncbn/forward_across_processes.h>
#include <syncbn/future_result.h>
#include <syncbn/message.h>
#include <syncbn/modules.h>
#include <syncbn/once_differentiable.h>
#include <syncbn/replica_backward.h>
#include <syncbn/replica_graph.h>
#include <syncbn/replicate.h>
#include <syncbn/replication_group.h>
#include <syncbn/sync_batch_norm.h>
#include <syncbn/sync_master.h>
#include <syncbn/training_forward_lock.h>
#include <syncbn/version.h>
