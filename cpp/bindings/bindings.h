#pragma once

#include <torch/extension.h>

// One function per core header (and bind_thread_state: ATen's thread-local state for the
// Python worker threads), gathered by module.cpp.
namespace syncbn::python {

void bind_batch_norm(pybind11::module_& m);
void bind_errors(pybind11::module_& m);
void bind_callback_context(pybind11::module_& m);
void bind_replica_graph(pybind11::module_& m);
void bind_replicate(pybind11::module_& m);
void bind_replication_group(pybind11::module_& m);
void bind_sync_master(pybind11::module_& m);
void bind_thread_state(pybind11::module_& m);
void bind_version(pybind11::module_& m);

}  // namespace syncbn::python
