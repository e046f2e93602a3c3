#include <syncbn/version.h>

#if !defined(SYNCBN_VERSION_MAJOR) || !defined(SYNCBN_VERSION_MINOR) || !defined(SYNCBN_VERSION_PATCH)
#error "the build must define SYNCBN_VERSION_MAJOR, _MINOR and _PATCH (from CMakeLists.txt's project version)"
#endif

namespace syncbn {

std::string version() {
  return std::to_string(SYNCBN_VERSION_MAJOR) + "." + std::to_string(SYNCBN_VERSION_MINOR) + "." +
         std::to_string(SYNCBN_VERSION_PATCH);
}

std::string compiler_version() {
#if defined(__clang__)
  return "Clang " __clang_version__;
#elif defined(__GNUC__)
  return "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_VER);
#else
  return "unknown compiler";
#endif
}

}  // namespace syncbn
