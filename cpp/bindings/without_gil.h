#pragma once

#include <cxxabi.h>

#include <type_traits>
#include <utility>

#include <torch/extension.h>

namespace syncbn::python {

// Runs `fn` (which must not touch Python) without the GIL, then takes the GIL
// back. Unlike py::gil_scoped_release it takes it back outside a destructor: a
// daemon thread that takes the GIL while the interpreter shuts down (a thread
// still waiting in run_slave when the program ends) is ended by pthread_exit,
// and that unwinding out of a noexcept destructor aborts the whole process.
// Use it for calls that may wait on other threads.
template <class Fn>
decltype(auto) without_gil(Fn&& fn) {
  PyThreadState* const saved = PyEval_SaveThread();
  try {
    if constexpr (std::is_void_v<std::invoke_result_t<Fn>>) {
      std::forward<Fn>(fn)();
      PyEval_RestoreThread(saved);
    } else {
      auto result = std::forward<Fn>(fn)();
      PyEval_RestoreThread(saved);
      return result;
    }
  } catch (abi::__forced_unwind&) {
    throw;  // the thread is being ended (by PyEval_RestoreThread itself, at shutdown): let it
  } catch (...) {
    PyEval_RestoreThread(saved);
    throw;
  }
}

}  // namespace syncbn::python
