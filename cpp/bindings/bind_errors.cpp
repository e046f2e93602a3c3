#include <syncbn/errors.h>

#include "bindings.h"
#include "py_object_ref.h"

namespace syncbn::python {

namespace py = pybind11;

namespace {

// Set once at import; the classes live as long as the module. (A translator is a
// plain function pointer, so it cannot capture them.)
PyObject* barrier_error_type = nullptr;
PyObject* barrier_timeout_error_type = nullptr;
PyObject* barrier_aborted_error_type = nullptr;

void translate_barrier_errors(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const BarrierTimeoutError& e) {
    PyErr_SetString(barrier_timeout_error_type, e.what());
  } catch (const BarrierAbortedError& e) {
    PyErr_SetString(barrier_aborted_error_type, e.what());
  } catch (const BarrierError& e) {
    PyErr_SetString(barrier_error_type, e.what());
  } catch (const PythonCallbackError& e) {
    // Every copy that waited on the failed callback raises the same type: a copy of
    // the original exception when it can be copied, carrying the original traceback.
    const py::object& original = e.exception();
    py::object raised = original;
    try {
      raised = py::module_::import("copy").attr("copy")(original);
    } catch (py::error_already_set&) {
      raised = original;
    }
    py::object type = py::reinterpret_borrow<py::object>(py::type::handle_of(raised));
    py::object traceback = original.attr("__traceback__");
    // PyErr_Restore steals one reference to each; no traceback is NULL, not None.
    PyObject* traceback_ptr = traceback.is_none() ? nullptr : traceback.release().ptr();
    PyErr_Restore(type.release().ptr(), raised.release().ptr(), traceback_ptr);
  }
}

py::object new_exception(py::module_& m, const char* name, const char* doc, py::tuple bases) {
  const std::string qualified = std::string("syncbn_ext.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases.ptr(), nullptr);
  if (type == nullptr) throw py::error_already_set();
  py::object result = py::reinterpret_steal<py::object>(type);
  m.attr(name) = result;
  return result;
}

}  // namespace

void bind_errors(py::module_& m) {
  py::object barrier_error = new_exception(
      m, "BarrierError", "A synchronization pass could not complete.", py::make_tuple(py::handle(PyExc_RuntimeError)));
  py::object timeout_error =
      new_exception(m, "BarrierTimeoutError", "Some copies never arrived within the barrier's timeout.",
                    py::make_tuple(barrier_error, py::handle(PyExc_TimeoutError)));
  py::object aborted_error = new_exception(
      m, "BarrierAbortedError", "The synchronization pass was aborted.", py::make_tuple(barrier_error));

  barrier_error_type = barrier_error.release().ptr();
  barrier_timeout_error_type = timeout_error.release().ptr();
  barrier_aborted_error_type = aborted_error.release().ptr();
  // Module-local: applies to this module's functions, and is tried before torch's.
  py::register_local_exception_translator(&translate_barrier_errors);
}

}  // namespace syncbn::python
