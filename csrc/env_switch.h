// ELECTRA_FAST_NO_* switches, read the same way everywhere (and as electra_fast/_cpu.py's switch()): set to anything
// but "" or "0" turns the path off.
#pragma once

#include <cstdlib>

namespace electra_fast {

inline bool env_switch(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && !(v[0] == '0' && v[1] == '\0');
}

}  // namespace electra_fast
