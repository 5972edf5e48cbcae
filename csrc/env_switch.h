// ELECTRA_FAST_NO_* switches, read the same way everywhere (and as electra_fast/_cpu.py's switch() and setup.py):
// on unless unset or "", "0", "false", "no", "off" (blanks stripped, any case): "false" turned the path off before.
#pragma once

#include <cctype>
#include <cstdlib>
#include <string>

namespace electra_fast {

inline bool env_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  std::string s(v);
  const auto blank = [](unsigned char c) { return std::isspace(c) != 0; };
  while (!s.empty() && blank(s.back())) s.pop_back();
  size_t first = 0;
  while (first < s.size() && blank(s[first])) ++first;
  s = s.substr(first);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return !(s.empty() || s == "0" || s == "false" || s == "no" || s == "off");
}

}  // namespace electra_fast
