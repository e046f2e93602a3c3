#pragma once

#include <string>

#include <syncbn/export.h>

namespace syncbn {

// The library version, "MAJOR.MINOR.PATCH".
SYNCBN_API std::string version();
// The compiler the library was built with, e.g. "GCC 12.2.0".
SYNCBN_API std::string compiler_version();

}  // namespace syncbn
