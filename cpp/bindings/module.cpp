#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The JIT build's module is made as syncbn_ext_jit: named as the prebuilt one before any class is bound, its
  // classes and exceptions are syncbn_ext._C's (pickles name them so; the loader registers it under that name).
  m.attr("__name__") = "syncbn_ext._C";
  m.doc() = "syncbn_ext._C: bindings of the syncbn C++ core (replication callbacks, barrier, BatchNorm).";
  syncbn::python::bind_errors(m);
  syncbn::python::bind_version(m);
  syncbn::python::bind_callback_context(m);
  syncbn::python::bind_replicate(m);
  syncbn::python::bind_replica_graph(m);
  syncbn::python::bind_replication_group(m);
  syncbn::python::bind_sync_master(m);
  syncbn::python::bind_thread_state(m);
  syncbn::python::bind_batch_norm(m);
}
