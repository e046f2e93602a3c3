#pragma once

// Environment variables that switch something on or off.

#include <cctype>
#include <optional>
#include <string>

namespace syncbn::detail {

// A switch's value: unset or blank is `unset`; 1/true/yes/on and 0/false/no/off (any case, blanks around) are on
// and off; nullopt for anything else, which the caller refuses (never read as on or off silently).
inline std::optional<bool> switch_value(const char* value, bool unset) {
  if (value == nullptr) return unset;
  std::string word;
  for (const char* c = value; *c != '\0'; ++c) {
    const auto byte = static_cast<unsigned char>(*c);
    if (!std::isspace(byte)) word += static_cast<char>(std::tolower(byte));
  }
  if (word.empty()) return unset;
  if (word == "1" || word == "true" || word == "yes" || word == "on") return true;
  if (word == "0" || word == "false" || word == "no" || word == "off") return false;
  return std::nullopt;
}

}  // namespace syncbn::detail
